"""Two processes on CPU (torchrun, gloo): the methods that decide per micro-batch where its
sequences come from stay in step across ranks, and the run is one run, not two copies."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, kdexp, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

QUICK = [*FAST, "train.save_every=0", "eval.max_samples=4", "eval.seeds=[10]", "eval.teacher=false",
         "rollout.max_new_tokens=12", "train.num_threads=1", "train.log_every=1"]


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    return kdexp("train", *args, cwd=cwd, nproc=2, timeout=600)


@pytest.mark.parametrize("method", ["gkd", "distillm"])
def test_two_processes_share_every_batch_source_decision(tmp_path, method):
    """GKD's coin per micro-batch and DistiLLM's scheduler (moved by a validation that only rank 0
    computes) drive both ranks alike; the loop compares every step's decisions across ranks and
    stops the run if they differ, so finishing is the proof. With lmbda=0.5 over 12 micro-batch
    draws both branches are taken (a rank that rolled out while the other did not would also
    desynchronize the gradient all-reduce counts)."""
    run = tmp_path / "run"
    extra = ["method.lmbda=0.5"] if method == "gkd" else ["train.eval_every=2", "train.eval_samples=4"]
    proc = torchrun(*QUICK, f"method={method}", "train.batch_size=8", "train.micro_batch_size=2",
                    f"hydra.run.dir={run}", *extra, cwd=tmp_path)
    assert proc.stdout.count("run directory:") == 1  # one run, reported by rank 0 only
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"train/loss"' in line]
    assert [r["step"] for r in records] == list(range(1, 7))
    last = records[-1]
    if method == "gkd":
        assert 0 < last["method/student_fraction"] < 1
    else:
        assert "method/phi" in last
    assert read_json(run / "results.json")["train"]["steps"] == 6


def test_online_kd_trains_student_and_teacher_module_under_ddp(tmp_path):
    """method=okd under DDP: the pair is one engine module; both sides train and are saved."""
    run = tmp_path / "run"
    torchrun(*QUICK, "method=okd", "train.batch_size=8", "train.micro_batch_size=2", f"hydra.run.dir={run}",
             cwd=tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"train/loss"' in line]
    assert all(r["train/teacher_grad_norm"] > 0 and r["train/grad_norm"] > 0 for r in records)
    assert (run / "final_teacher_adapter" / "adapter_model.safetensors").is_file()
    assert read_json(run / "results.json")["train"]["steps"] == 6


def steps(run) -> list[dict]:
    """The logged training steps of a run: loss, learning rate, gradient norms."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in ("step", "train/loss", "train/lr", "train/grad_norm")}
            for r in rows if "train/loss" in r]


@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_two_processes_train_like_one(tmp_path, method):
    """The same global batch over 2 processes or 1: the same loss curve, learning-rate schedule
    and final weights (up to float reduction order). The schedule counts optimizer steps
    (accelerate would step it once per process, running the warmup and decay twice as fast).
    gkd with lmbda=1 trains on student samples only: each micro-batch is sampled with the
    generator of its place in the global batch, so 2 processes draw the samples 1 draws."""
    args = [*QUICK, f"method={method}", "train.batch_size=8", "train.micro_batch_size=2",
            "train.warmup_steps=2", "train.min_lr_ratio=0.1", "method.lmbda=1" if method == "gkd" else "seed=0"]
    kdexp("train", *args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two, strict=True):
        assert b["train/lr"] == pytest.approx(a["train/lr"], rel=1e-12)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    assert one[-1]["train/lr"] < one[1]["train/lr"]  # the schedule did decay
    for name, tensor in load_file(str(tmp_path / "one" / "final" / "model.safetensors")).items():
        other = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))[name]
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_sample_weights_are_normalized_over_the_step_across_processes(tmp_path):
    """WSGO's weights (the teacher's likelihood of each sequence) have mean 1 over the whole
    optimizer step: 1 process with micro-batches of 4 and 2 processes with micro-batches of 1
    (where a per-micro-batch normalization would make every weight 1) train alike."""
    args = [*QUICK, "method=kd", "method.sample_weight=teacher_likelihood", "method.min_weight=0.01",
            "train.batch_size=8", "seed=0"]
    kdexp("train", *args, "train.micro_batch_size=4", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    torchrun(*args, "train.micro_batch_size=1", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
