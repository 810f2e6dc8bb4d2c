"""The sharded engines on CPU (gloo, 2 processes under torchrun), DeepSpeed ZeRO and FSDP2:
the same run as without them.

ZeRO stages 2 and 3 and FSDP2 against a plain run with the same global batch (one process for
kd; two DDP processes for okd, gkd and seqkd, whose LoRA dropout and samples draw per process):
the loss curve, the final student and (online KD) the teacher's module agree up to float
reduction order; the run checkpoints, resumes, evaluates (the engines gather the model for
generation) and saves whole Hugging Face / PEFT directories. The plain runs are shared, and so
is each engine's run with the kill/resume test of its engine.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kdexp, read_json
from tests.smoke.test_distributed import QUICK, steps

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

# DeepSpeed clips over all parameters at once, where the plain loop clips the student and
# OKD's teacher module each on its own: the methods with two groups compare without clipping,
# kd (one group, gradient norms ~3) with it.
ARGS = [*QUICK, "train.batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=0",
        "train.max_grad_norm=0", "train.save_every=3", "train.eval_every=3", "train.eval_samples=4"]


def method_args(method: str) -> list[str]:
    return [*ARGS, f"method={method}", *(["train.max_grad_norm=1.0"] if method == "kd" else [])]


def run_once(tmp_path_factory, name: str, args, nproc):
    """method -> the run directory of ``kdexp train *args(method)`` on ``nproc(method)``
    processes, computed once per method (a module fixture's)."""
    runs = {}

    def get(method: str):
        if method not in runs:
            root = tmp_path_factory.mktemp(f"{name}-{method}")
            kdexp("train", *args(method), f"hydra.run.dir={root / 'run'}", cwd=root, nproc=nproc(method),
                  timeout=600)
            runs[method] = root / "run"
        return runs[method]

    return get


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """method -> the run directory of the plain reference run (one process for kd, two DDP else)."""
    return run_once(tmp_path_factory, "plain", method_args, lambda m: 1 if m == "kd" else 2)


def weights(run, name: str = "final/model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def assert_same_run(run, reference) -> None:
    a, b = steps(reference), steps(run)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-4)
        if "train/grad_norm" in x and "train/grad_norm" in y:  # over every shard (before clipping)
            assert y["train/grad_norm"] == pytest.approx(x["train/grad_norm"], rel=1e-3)
    files = ["final/model.safetensors"]
    if (reference / "final_teacher_adapter").is_dir():
        files.append("final_teacher_adapter/adapter_model.safetensors")
    # The teacher module's gradients are tiny (~1e-3 of the student's), so Adam, which divides
    # by their running scale, turns reduction-order noise into visible update noise: 5e-4 is
    # 3 % of what 6 steps at lr 3e-3 can move a weight.
    for name, atol in zip(files, (1e-4, 5e-4), strict=False):
        ref, got = weights(reference, name), weights(run, name)
        for key in ref:  # a tied lm_head may be stored once or twice: the reference's keys
            torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=atol, msg=f"{name}: {key}")


def zero_args(key: str) -> list[str]:
    """``"okd 2"`` -> the arguments of okd under ZeRO-2 (kd under ZeRO-3: its partitioned teacher generates)."""
    method, stage = key.split()
    return [*method_args(method), f"deepspeed=zero{stage}", *(["eval.teacher=true"] if key == "kd 3" else [])]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """``"method stage"`` -> the run directory of its ZeRO run on 2 processes (shared with the resume test)."""
    return run_once(tmp_path_factory, "zero", zero_args, lambda key: 2)


# kd under stage 2 is left out: okd covers stage 2 (and its resume, below), kd stage 3 the rest
@pytest.mark.parametrize(("method", "stage"), [("kd", 3), ("okd", 2), ("okd", 3), ("gkd", 3), ("seqkd", 3)])
def test_zero_on_two_processes_matches_the_plain_run(zero_run, plain, method, stage):
    """Under ZeRO-3 the frozen teacher is partitioned too (okd's is part of the trained pair);
    gkd samples from the student and seqkd from the teacher with their parameters gathered."""
    run = zero_run(f"{method} {stage}")
    assert_same_run(run, plain(method))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert read_json(run / "results.json")["train"]["steps"] == 6
    if method == "okd":
        assert (run / "final_teacher_adapter" / "adapter_config.json").is_file()
    if (method, stage) == ("kd", 3):
        assert read_json(run / "results.json")["teacher"]["rougeL"] > 50  # the trained teacher, whole
    log = (run / "train.log").read_text()
    partitioned = "the teacher is partitioned across the 2 processes (ZeRO-3)" in log
    assert partitioned == (stage == 3 and method != "okd")
    # every stage takes the fused loss path: under ZeRO-3 with each head gathered for the loss
    assert "loss: fused" in log, log


def test_zero_in_one_process_without_a_launcher(tmp_path, plain):
    """`kdexp train deepspeed=zero1` with no torchrun: DeepSpeed gets a one-process group."""
    run = tmp_path / "run"
    kdexp("train", *method_args("kd"), "deepspeed=zero1", f"hydra.run.dir={run}", cwd=tmp_path,
          own_process=True)  # DeepSpeed's process-wide state outlives a run
    assert_same_run(run, plain("kd"))


def test_zero2_killed_and_resumed_is_the_same_run(tmp_path, zero_run):
    """OKD under ZeRO-2, killed after step 4 (checkpoint at 3), resumed from DeepSpeed's
    checkpoint: the same losses and final weights as the uninterrupted ZeRO-2 run."""
    args = zero_args("okd 2")
    killed = kdexp("train", *args, f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path, nproc=2,
                   timeout=600, env={"KDEXP_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "resumed" / "results.json").exists()
    kdexp("train", *args, "train.resume=true", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path,
          nproc=2, timeout=600)
    clean = zero_run("okd 2")
    assert steps(tmp_path / "resumed") == steps(clean)
    for name in ("final/model.safetensors", "final_teacher_adapter/adapter_model.safetensors"):
        clean_w, resumed = weights(clean, name), weights(tmp_path / "resumed", name)
        assert clean_w.keys() == resumed.keys()
        for key in clean_w:
            assert torch.equal(clean_w[key], resumed[key]), f"{name}: {key}"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """method -> the run directory of its FSDP2 run on 2 processes (kd: the sharded teacher generates)."""
    return run_once(tmp_path_factory, "fsdp", lambda m: [*method_args(m), "fsdp=full_shard",
                                                          *(["eval.teacher=true"] if m == "kd" else [])], lambda m: 2)


@pytest.mark.parametrize("method", ["kd", "gkd", "okd"])
def test_fsdp2_on_two_processes_matches_the_plain_run(fsdp_run, plain, method):
    """FSDP2 shards the student and the frozen teacher (okd: both models of the trained pair);
    gkd samples from the student with its layers gathered; the fused loss reads the gathered
    heads; the checkpoints hold the gathered state and the final directories are whole."""
    run = fsdp_run(method)
    assert_same_run(run, plain(method))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    results = read_json(run / "results.json")
    assert results["train"]["steps"] == 6
    if method == "okd":
        assert (run / "final_teacher_adapter" / "adapter_config.json").is_file()
    if method == "kd":
        assert results["teacher"]["rougeL"] > 50  # the sharded teacher, gathered to generate
    log = (run / "train.log").read_text()
    assert "FSDP2 (full_shard) over gloo" in log and "loss: fused" in log, log
    assert ("the teacher is partitioned across the 2 processes (FSDP2)" in log) == (method != "okd")


def test_fsdp2_killed_and_resumed_is_the_same_run(tmp_path, fsdp_run):
    """OKD under FSDP2 killed after step 4 (checkpoint at 3) and resumed from the gathered
    checkpoint: bit for bit the uninterrupted FSDP2 run's losses and final weights."""
    run = tmp_path / "resumed"
    args = [*ARGS, "method=okd", "fsdp=full_shard", f"hydra.run.dir={run}"]
    killed = kdexp("train", *args, cwd=tmp_path, nproc=2, timeout=600, env={"KDEXP_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0 and not (run / "results.json").exists()
    kdexp("train", *args, "train.resume=true", cwd=tmp_path, nproc=2, timeout=600)
    clean = fsdp_run("okd")
    assert steps(run) == steps(clean)
    for name in ("final/model.safetensors", "final_teacher_adapter/adapter_model.safetensors"):
        a, b = weights(clean, name), weights(run, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"


def test_fsdp2_in_one_process_in_bf16(tmp_path, plain):
    """`kdexp train fsdp=shard_grad_op train.mixed_precision=bf16` without a launcher: one
    process gets a group of its own; layers gathered in bfloat16 (gradients reduced in float32)
    train as the float32 plain run does, up to bfloat16's rounding."""
    run = tmp_path / "run"
    kdexp("train", *method_args("kd"), "fsdp=shard_grad_op", "train.mixed_precision=bf16", f"hydra.run.dir={run}",
          cwd=tmp_path, own_process=True)
    assert "training on 1 process (cpu, FSDP2 (shard_grad_op) over gloo)" in (run / "train.log").read_text()
    a, b = steps(plain("kd")), steps(run)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=2e-3)  # seen: 3.5e-4
