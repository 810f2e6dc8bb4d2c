"""A run survives what clusters do to it: SIGKILL at any moment, SIGTERM / SIGUSR1 before a time
limit, and NaN steps; each ends in a state a resumed run continues bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kdexp import checkpoint
from tests.conftest import FAST, kdexp, logged

pytestmark = pytest.mark.slow

# A random step for every run of the suite; printed on failure, fixed with KDEXP_TEST_SEED.
SEED = int(os.environ.get("KDEXP_TEST_SEED", random.randrange(10**6)))
METHODS = {"kd": [], "gkd": ["method=gkd", "rollout.max_new_tokens=16"], "okd": ["method=okd", "method.dropout=0.1"]}
ARGS = [*FAST, "train.max_steps=8", "train.log_every=1", "train.save_every=2", "train.eval_every=3",
        "train.eval_samples=4"]


def popen(*args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdexp", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def steps_logged(run) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"train/loss"' in line) if path.exists() else 0


def interrupt_after(proc: subprocess.Popen, run, step: int, signum: int) -> tuple[int, str]:
    """Send ``signum`` once ``step`` steps are logged; ``(exit status, stderr)``."""
    deadline = time.time() + 240
    while steps_logged(run) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def final_weights(run) -> dict[str, torch.Tensor]:
    found = load_file(str(run / "final" / "model.safetensors"))
    if (run / "final_teacher_adapter").is_dir():  # okd: the teacher's module is trained state too
        adapter = load_file(str(run / "final_teacher_adapter" / "adapter_model.safetensors"))
        found.update({f"teacher.{k}": v for k, v in adapter.items()})
    return found


def totals(run) -> dict[str, int]:
    """What results.json says the whole run did."""
    train = json.loads((run / "results.json").read_text())["train"]
    return {"steps": train["steps"], "tokens": train["tokens"]}


def assert_same_weights(a, b, context: str) -> None:
    assert a.keys() == b.keys(), context
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs ({context})"


@pytest.fixture(scope="module", params=list(METHODS), ids=list(METHODS))
def clean_run(request, tmp_path_factory):
    """An uninterrupted run of each method: the reference the interrupted ones must match."""
    root = tmp_path_factory.mktemp(f"clean-{request.param}")
    args = [*ARGS, *METHODS[request.param]]
    kdexp("train", *args, f"hydra.run.dir={root / 'run'}", cwd=root)
    return args, root / "run"


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(clean_run, tmp_path):
    """Killed from outside after a random step (possibly inside a checkpoint write): resuming
    from whatever checkpoint survived ends with exactly the uninterrupted run's weights, and
    results.json reports the whole run: the uninterrupted run's steps and tokens, its metrics
    log and its final evaluation."""
    args, clean = clean_run
    step = random.Random(SEED).randint(3, 6)
    run = tmp_path / "run"
    status, _ = interrupt_after(popen("train", *args, f"hydra.run.dir={run}", cwd=tmp_path), run, step,
                                signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert checkpoint.list_checkpoints(run), "no checkpoint survived"
    kdexp("train", *args, "train.resume=true", f"hydra.run.dir={run}", cwd=tmp_path)
    context = f"killed after step {step}, KDEXP_TEST_SEED={SEED}"
    assert_same_weights(final_weights(clean), final_weights(run), context)
    assert totals(run) == totals(clean), context
    assert logged(run) == logged(clean), context
    a, b = (json.loads((r / "results.json").read_text()) for r in (clean, run))
    assert (a["rougeL"], a["exact_match"]) == (b["rougeL"], b["exact_match"]), context


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_termination_signal_checkpoints_and_exits_cleanly(signum, tmp_path):
    """What SLURM sends before a time limit: the step finishes, a checkpoint is written, the
    process exits with 128 + the signal's number and one line that says how to continue."""
    args = [*ARGS, "train.max_steps=40", "train.save_every=100"]
    step = random.Random(SEED).randint(2, 5)
    run = tmp_path / "run"
    status, err = interrupt_after(popen("train", *args, f"hydra.run.dir={run}", cwd=tmp_path), run, step, signum)
    assert status == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("kdexp: stopped by")]
    assert len(line) == 1 and signal.Signals(signum).name in line[0] and "train.resume=true" in line[0], err[-2000:]
    saved = checkpoint.list_checkpoints(run)
    assert len(saved) == 1 and checkpoint.verify(saved[0]) is None
    stopped_at = int(saved[0].name.split("_")[1])
    assert step <= stopped_at < 40 and f"after step {stopped_at} of 40" in line[0]
    assert not (run / "final").exists()


def test_a_signal_then_resume_is_bit_identical(tmp_path):
    args = [*ARGS, "train.save_every=100"]
    kdexp("train", *args, f"hydra.run.dir={tmp_path / 'clean'}", cwd=tmp_path)
    run = tmp_path / "run"
    step = random.Random(SEED).randint(2, 6)
    status, err = interrupt_after(popen("train", *args, f"hydra.run.dir={run}", cwd=tmp_path), run, step,
                                  signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, err[-2000:]
    kdexp("train", *args, "train.resume=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert_same_weights(final_weights(tmp_path / "clean"), final_weights(run),
                        f"SIGTERM after step {step}, KDEXP_TEST_SEED={SEED}")


def test_a_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path):
    run = tmp_path / "run"
    proc = kdexp("train", *ARGS, f"hydra.run.dir={run}", cwd=tmp_path, env={"KDEXP_NAN_AT_ATTEMPT": "3,4"})
    assert (proc.stdout + proc.stderr).count("not finite; the step is skipped") == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]
    assert [r["step"] for r in rows] == list(range(1, 9))  # 8 updates all the same
    assert "train/skipped_steps" not in rows[1] and rows[2]["train/skipped_steps"] == 2
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())


def test_consecutive_non_finite_steps_abort_and_keep_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = kdexp("train", *ARGS, "train.max_bad_steps=3", f"hydra.run.dir={run}", cwd=tmp_path,
                 env={"KDEXP_NAN_AT_ATTEMPT": "6,7,8"}, check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("kdexp: error:")]
    assert len(line) == 1 and "3 consecutive steps" in line[0] and "step_0000004" in line[0], proc.stderr[-2000:]
    saved = checkpoint.list_checkpoints(run)
    assert [p.name for p in saved] == ["step_0000002", "step_0000004"]
    assert all(checkpoint.verify(p) is None for p in saved)
    assert not (run / "final").exists() and not (run / "results.json").exists()


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    """The run directory on a small file system that holds one checkpoint but not two."""
    run = tmp_path / "disk"
    run.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(run)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        proc = kdexp("train", *ARGS, "train.eval_every=0", f"hydra.run.dir={run}", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = [x for x in proc.stderr.splitlines() if x.startswith("kdexp: error:")]
        assert len(line) == 1 and "could not write checkpoint step 4" in line[0] and "ENOSPC" in line[0], proc.stderr[-3000:]
        saved = checkpoint.list_checkpoints(run)
        assert [p.name for p in saved] == ["step_0000002"] and checkpoint.verify(saved[0]) is None
        assert not [p for p in checkpoint.checkpoint_dir(run).iterdir() if p.name.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(run)], check=False)


def test_a_handler_installed_before_the_run_gets_the_signal_after_the_checkpoint(tmp_path):
    """As under submitit, whose SIGUSR2 handler requeues the job: it runs after the checkpoint."""
    run = tmp_path / "run"
    wrapper = ("import signal, sys\n"
               "def requeue(signum, frame):\n"
               "    open('handed-over', 'w').write(signal.Signals(signum).name)\n"
               "    sys.exit(7)\n"
               "signal.signal(signal.SIGUSR2, requeue)\n"
               "from kdexp.cli import main\n"
               "main(sys.argv[1:])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = [*ARGS, "train.max_steps=40", "train.save_every=100", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-c", wrapper, "train", *args], cwd=tmp_path, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status, err = interrupt_after(proc, run, 2, signal.SIGUSR2)
    assert status == 7, err[-2000:]
    assert (tmp_path / "handed-over").read_text() == "SIGUSR2"
    saved = checkpoint.list_checkpoints(run)
    assert len(saved) == 1 and checkpoint.verify(saved[0]) is None
