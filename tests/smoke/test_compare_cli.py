"""``kdexp compare`` on a real sweep: 2 kd weights x 2 seeds on the bundled models."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import FAST, kdexp, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]


def test_compare_a_sweep_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    kdexp("train", "-m", "+sweep=kd_weight", "method.kd_weight=1,0.5", "seed=0,1", *FAST, "train.max_steps=2",
          "train.save_every=0", "eval.teacher=false", "eval.seeds=[10]", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    out = tmp_path / "cmp"
    proc = kdexp("compare", str(sweep), "--wandb-report", "logger=none", f"hydra.run.dir={out}", cwd=tmp_path)
    assert "Best configuration per method (by rougeL)" in proc.stdout and "W&B is offline" in proc.stdout
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method.kd_weight"] for r in rows] and sorted(r["method.kd_weight"] for r in rows) == ["0.5", "1"]
    assert all(r["n"] == "2" and r["seeds"] == "0 1" and r["method"] == "kd" for r in rows)
    record = read_json(out / "compare.json")
    assert record["params"] == ["method.kd_weight"] and "compare_method.kd_weight.png" in record["figures"]
    for name in ("compare.md", "compare.html", "compare_method.kd_weight.png", "wandb_report.json"):
        assert (out / name).is_file(), name
    for row in record["rows"]:  # each row's mean is the mean of its runs' results
        values = [read_json(f"{run}/results.json")["rougeL"] for run in row["runs"]]
        assert row["rougeL"] == pytest.approx(sum(values) / len(values))


def test_compare_without_runs_is_a_one_line_error(tmp_path):
    proc = kdexp("compare", str(tmp_path / "nowhere"), "logger=none", f"hydra.run.dir={tmp_path / 'out'}",
                 cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
