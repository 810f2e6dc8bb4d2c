"""The benchmark scripts run (numbers are reported by `make bench`, never asserted as timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]


def test_throughput_benchmark_writes_its_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--steps", "12", "--rounds", "1",
                           "--methods", "sft", "kd", "--new-tokens", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "throughput.json").read_text())
    by = {r["method"]: r for r in result["methods"]}
    assert by["sft"]["vs_sft"] == 1.0 and by["sft"]["teacher_forward_s"] == 0.0  # no teacher in sft
    assert by["kd"]["teacher_forward_s"] > 0 and by["kd"]["step_s"] > by["kd"]["teacher_forward_s"]
    overhead = result["kd_overhead"]
    assert overhead["ratio"] == pytest.approx(overhead["kd_step_s"] / (overhead["sft_step_s"] + overhead["teacher_forward_s"]))
    assert [r["batch"] for r in result["rollout"]] == [1, 8, 32] and all(r["tokens"] > 0 for r in result["rollout"])
    assert "kd overhead" in (tmp_path / "throughput.md").read_text()
