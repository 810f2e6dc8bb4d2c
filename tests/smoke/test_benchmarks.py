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
                           "--methods", "sft", "kd", "kd (teacher cache)", "--new-tokens", "8", "--out", str(tmp_path)],
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
    cached = result["kd_cache_vs_sft"]
    assert cached["throughput_ratio"] == pytest.approx(by["sft"]["step_s"] / by["kd (teacher cache)"]["step_s"])
    assert by["kd (teacher cache)"]["teacher_forward_s"] < by["kd"]["teacher_forward_s"]  # no teacher forward


@pytest.mark.parametrize("trainer", ["gkd", "distillation"])
def test_trl_benchmark_reports_both_sides(tmp_path, trainer):
    pytest.importorskip("trl", reason="the TRL comparison needs `pip install trl==1.16.0`")
    # lmbda 1 (the only one of DistillationTrainer): every step samples from the student on both
    # sides, so 5 steps always time both.
    lmbda = ["--lmbda", "1"] if trainer == "gkd" else []
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trl_gkd.py"), "--steps", "5", "--rounds", "1",
                           "--batch", "4", "--new-tokens", "8", *lmbda, "--beta", "0.9", "--warmup", "2",
                           "--trainer", trainer, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "trl_gkd" if trainer == "gkd" else "trl_distillation"
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["settings"]["lmbda"] == 1 and "method.lmbda=1.0" in result["kdexp_overrides"]
    kd, trl = result["sides"]["kdexp"], result["sides"]["trl"]
    for side in (kd, trl):
        assert side["step_s"] > 0 and side["peak_mib"] > 0 and side["above_start_mib"] > 0
        assert side["steps_on_policy"] == 3 and side["steps_off_policy"] == 0  # steps 3..5 timed
        assert side["step_s"] == pytest.approx(side["step_s_on_policy"])
        assert 0 < side["tokens_on_policy"] <= 4 * 8  # at most batch x new tokens are trained on
    ratios = result["ratios"]
    assert ratios["step_time"] == pytest.approx(kd["step_s"] / trl["step_s"])
    assert ratios["speedup"] == pytest.approx(trl["step_s"] / kd["step_s"])
    assert ratios["peak_memory"] == pytest.approx(kd["peak_mib"] / trl["peak_mib"])
    assert result["beta_convention"]["max_abs_diff"] < (1e-9 if trainer == "gkd" else 1e-5)
    assert result["settings"]["beta"] == 0.9 and "loss.beta=0.9" in result["kdexp_overrides"]
    assert "Not identical" in (tmp_path / f"{stem}.md").read_text()


def test_divergence_benchmark_measures_both_paths_and_reports_their_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "divergences.py"), "--vocab", "4096",
                           "--positions", "64", "--losses", "fkl", "jsd", "--chunk", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "divergences.json").read_text())
    cells = {(c["loss"], c["path"]): c for c in result["cells"]}
    assert set(cells) == {(loss, path) for loss in ("fkl", "jsd") for path in ("plain", "chunked")}
    for c in cells.values():
        assert c["error"] is None and c["vocab"] == 4096 and c["positions"] == 64
        assert c["seconds"] > 0 and c["extra_bytes"] > 0 and c["grad_bytes"] == 64 * 4096 * 2  # bf16 student grad
    assert cells["fkl", "chunked"]["chunk"] == 16 and cells["fkl", "plain"]["chunk"] is None
    for r in result["ratios"]:
        plain, chunked = cells[r["loss"], "plain"], cells[r["loss"], "chunked"]
        assert r["memory_ratio"] == pytest.approx(chunked["extra_bytes"] / plain["extra_bytes"])
        assert r["time_ratio"] == pytest.approx(chunked["seconds"] / plain["seconds"])
        assert chunked["value"] == pytest.approx(plain["value"], rel=1e-5)  # the same loss either way
    assert {r["loss"] for r in result["ratios"]} == {"fkl", "jsd"}
    assert set(result["target"]["per_loss"]) == {"fkl", "jsd"} and result["target"]["positions"] == 64
    text = (tmp_path / "divergences.md").read_text()
    assert "## V = 4096" in text and "Target: chunked peak memory <= 25%" in text


def test_teacher_cache_benchmark_compares_each_k_with_the_live_teacher(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "teacher_cache.py"), "--ks", "4", "1024",
                           "--seeds", "0", "--steps", "6", "--extra", "data.toy.n_train=32", "data.toy.n_test=4",
                           "eval.seeds=[10]", "train.log_every=2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["teacher"]: r for r in json.loads((tmp_path / "teacher_cache.json").read_text())["rows"]}
    assert list(rows) == ["live", "top-4", "top-1024"]
    assert rows["top-4"]["bytes_per_token"] == 4 * 4 + 4 and rows["top-1024"]["bytes_per_token"] == 1024 * 4 + 4
    assert rows["top-4"]["positions"] == rows["top-1024"]["positions"] > 32
    for r in rows.values():
        assert r["step_time_vs_live"] == pytest.approx(r["step_s"] / rows["live"]["step_s"])
        assert r["rougeL_vs_live"] == pytest.approx(r["rougeL"] - rows["live"]["rougeL"])
    # k = V holds the teacher's whole distribution: the same run as the live teacher (float16 aside)
    assert abs(rows["top-1024"]["rougeL_vs_live"]) < 5


def test_fused_benchmark_measures_every_path_with_the_same_loss(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused.py"), "--shapes", "tiny",
                           "--positions", "300", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {c["path"]: c for c in json.loads((tmp_path / "fused.json").read_text())}
    assert set(cells) == {"plain", "chunked", "fused", "sft", "sft fused"}
    assert all(not c.get("error") and c["seconds"] > 0 and c["extra"] > 0 for c in cells.values())
    # the same objective on the same inputs, whichever path computes it
    assert cells["fused"]["value"] == pytest.approx(cells["plain"]["value"], rel=1e-5)
    assert cells["chunked"]["value"] == pytest.approx(cells["plain"]["value"], rel=1e-5)
    assert cells["sft fused"]["value"] == pytest.approx(cells["sft"]["value"], rel=1e-5)
    assert "| tiny |" in (tmp_path / "fused.md").read_text()


def test_gpu_check_runs_every_step_on_cpu_with_smoke(tmp_path):
    """make gpu-check's script, on CPU with tiny settings, so that it works when a GPU is lent
    (its TRL, throughput and loss-side steps run the scripts the tests above run: left out here)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--skip", "trl",
                           "distillation", "throughput", "fused", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {r["step"]: r for r in result["steps"]}
    assert result["smoke"] and result["device"].startswith("CPU")
    assert steps["method=kd"]["status"] == 0 and steps["method=kd"]["loss path"].startswith("fused")
    assert steps["method=minillm"]["status"] == 0
    assert steps["online speculative decoding (kdexp osd)"]["status"] == 0
    vllm = next(r for name, r in steps.items() if name.startswith("vLLM rollouts"))
    assert vllm["status"] == "not available: no GPU"  # said, not failed, where it cannot run
    assert steps["method=minillm"]["loss path"].startswith("plain path")  # policy-gradient terms
    assert [r["status"] for name, r in steps.items() if "benchmarks/" in name and r is not vllm] == [0, 0], steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # 2 files come back
    assert set(result["details"]) == {"fused_step", "sampler_profile_smoke", "vllm_rollouts"}
    sampler = result["details"]["sampler_profile_smoke"]["rows"]
    assert sampler["kdexp"]["tokens"] == sampler["generate"]["tokens"] == 4 * 6  # every row to full length
    report = (tmp_path / "gpu_check.md").read_text()
    assert "gpu-check on CPU" in report and "# A whole kd step" in report
    assert "# Where an on-policy step's time goes" in report
