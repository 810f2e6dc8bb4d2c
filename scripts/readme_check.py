"""Keep the README's default-run table equal to what `kdexp train` prints.

    python scripts/readme_check.py            # run the default job, compare (exit 1 and a diff if they differ)
    python scripts/readme_check.py --write    # the same, and put the printed table into the README

`make reproduce` runs it first. The table is the block from "### test split" to the student's
row that `kdexp train` prints at the end; the README quotes it in its quick start.
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START = "### test split of data=toy"


def table(text: str) -> str:
    """The printed evaluation table in ``text``: its title, the blank line, its rows."""
    lines = text.splitlines()
    i = next((i for i, line in enumerate(lines) if line.startswith(START)), None)
    if i is None:
        raise ValueError(f"no '{START}' table in the text")
    out, j = [lines[i]], i + 1
    while j < len(lines) and not lines[j].strip():
        out, j = out + [lines[j]], j + 1
    while j < len(lines) and lines[j].startswith("|"):
        out, j = out + [lines[j]], j + 1
    return "\n".join(out)


def replace_table(readme: str, new: str) -> str:
    old = table(readme)
    return readme.replace(old, new, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the printed table into the README")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TQDM_DISABLE": "1"}
        proc = subprocess.run([sys.executable, "-m", "kdexp", "train", f"hydra.run.dir={tmp}/run"],
                              cwd=ROOT, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return proc.returncode
    printed, readme = table(proc.stdout), README.read_text()
    quoted = table(readme)
    if printed == quoted:
        print("readme-check: the README's default-run table is what `kdexp train` prints")
        return 0
    print("readme-check: the README's table differs from what `kdexp train` prints:")
    print("\n".join(difflib.unified_diff(quoted.splitlines(), printed.splitlines(), "README.md", "kdexp train",
                                         lineterm="")))
    if args.write:
        README.write_text(replace_table(readme, printed))
        print("readme-check: wrote the printed table into README.md")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
