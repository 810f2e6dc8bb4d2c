"""scripts/readme_check.py finds the printed table in `kdexp train`'s output and in the README."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("readme_check", ROOT / "scripts" / "readme_check.py")
readme_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_check)

PRINTED = """wandb: noise
### test split of data=toy (200 prompts)

| model | ROUGE-L | exact match | n | seeds |
|---|---|---|---|---|
| teacher | 93.03 ± 0.19 | 72.83 ± 0.29 | 200 | 3 |
| student | 70.00 ± 0.50 | 30.00 ± 0.40 | 200 | 3 |

run directory: runs/x
"""


def test_the_table_is_found_in_the_output_and_in_the_readme():
    found = readme_check.table(PRINTED)
    assert found.splitlines()[0].startswith("### test split") and found.splitlines()[-1].startswith("| student |")
    quoted = readme_check.table((ROOT / "README.md").read_text())
    assert quoted.splitlines()[-1].startswith("| student |") and len(quoted.splitlines()) == 6


def test_a_different_table_is_replaced_in_place():
    readme = (ROOT / "README.md").read_text()
    new = readme_check.replace_table(readme, readme_check.table(PRINTED))
    assert readme_check.table(new) == readme_check.table(PRINTED)
    assert new.replace(readme_check.table(PRINTED), "") == readme.replace(readme_check.table(readme), "")
