"""scripts/summarize.py: mean and std over seeds, time relative to a reference group."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "summarize.py"


def _run(root: Path, name: str, method: str, seed: int, rouge: float, time_s: float, lmbda=None):
    run = root / name
    run.mkdir(parents=True)
    lm = "null" if lmbda is None else lmbda
    (run / "config.yaml").write_text(f"seed: {seed}\nmethod:\n  name: {method}\n  lmbda: {lm}\n")
    (run / "results.json").write_text(json.dumps({"rougeL": rouge, "exact_match": rouge / 2,
                                                  "train": {"time_s": time_s}}))


def _summarize(*args: str) -> subprocess.CompletedProcess:
    """The script's ``main`` in this process (the first test runs it as a program)."""
    spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(list(args))
        except SystemExit as exit_:  # as the interpreter would: a message goes to stderr, status 1
            status = exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=err)
    return subprocess.CompletedProcess(["summarize", *args], status, out.getvalue(), err.getvalue())


def test_groups_over_several_roots_with_relative_time(tmp_path):
    for seed, (r, t) in enumerate([(70, 100), (80, 120)]):
        _run(tmp_path / "a", f"kd{seed}", "kd", seed, r, t)
    _run(tmp_path / "b", "g0", "gkd", 0, 10, 330, lmbda=1)
    _run(tmp_path / "b", "g1", "gkd", 1, 20, 330, lmbda=0.5)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b"), "--by",
                          "method.name", "method.lmbda", "--relative-to", "kd"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in out.stdout.splitlines()[2:]}
    assert "| 2 | 0,1 | 75.00 ± 7.07 | 37.50 ± 3.54 | 110.0 | 1.00 |" in rows[("kd", "None")]
    assert rows[("gkd", "1")].endswith("| 330.0 | 3.00 |") and ("gkd", "0.5") in rows


def test_relative_to_a_missing_group_is_an_error(tmp_path):
    _run(tmp_path, "r", "sft", 0, 50, 10)
    out = _summarize(str(tmp_path), "--relative-to", "kd")
    assert out.returncode != 0 and "--relative-to kd" in out.stderr


@pytest.mark.parametrize("args", [["--by", "method.name"], []])
def test_single_run_has_no_spread(tmp_path, args):
    _run(tmp_path, "r", "sft", 3, 50, 10)
    out = _summarize(str(tmp_path), *args)
    assert "| sft | 1 | 3 | 50.00 | 25.00 | 10.0 |" in out.stdout


def test_runs_that_differ_in_a_swept_value_are_not_merged(tmp_path):
    """The same method, seed 0, fkl and rkl: two rows, not one with seeds "0,0"."""
    for loss, rouge in (("fkl", 60), ("rkl", 70)):
        run = tmp_path / loss
        (run / ".hydra").mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: 0\nmethod:\n  name: kd\nloss:\n  name: {loss}\n")
        (run / ".hydra" / "overrides.yaml").write_text(f"- method=kd\n- loss={loss}\n- seed=0\n")
        (run / "results.json").write_text(json.dumps({"rougeL": rouge, "exact_match": 1.0, "train": {"time_s": 1.0}}))
    out = _summarize(str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("| loss | runs |")
    assert "| fkl | 1 | 0 | 60.00 |" in out.stdout and "| rkl | 1 | 0 | 70.00 |" in out.stdout
