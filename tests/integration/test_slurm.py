"""Sweeps through hydra-submitit-launcher on a real (single-node, local) SLURM cluster.

The cluster is started by ``scripts/local_slurm.sh`` (Debian's slurm-wlm and munge, as root);
on a machine where that cannot run (not root, no apt), the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, ROOT, kdexp, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

# Small jobs: one CPU each, so that two run side by side on a 2-core machine.
# The runs log to W&B (offline): each job is its own W&B run, and a requeued job its same run.
FAST_WANDB = [a for a in FAST if a != "logger=none"] + ["logger=wandb"]
LAUNCH = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3",
          "hydra.launcher.timeout_min=20", "train.num_threads=1"]


@pytest.fixture(scope="module")
def slurm():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'kdexp[slurm]'")
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster, and starting one (scripts/local_slurm.sh) needs root")
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh")], capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"scripts/local_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return True


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_two_job_sweep_runs_on_slurm(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    kdexp("train", "-m", "+sweep=kd_weight", "method.kd_weight=1,0.5", *LAUNCH, *FAST_WANDB,
          f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    runs = job_dirs(sweep)
    assert [r.name for r in runs] == ["0", "1"]
    weights = []
    for run in runs:
        cfg = read_json(run / "results.json")
        assert cfg["train"]["steps"] == 6 and 0 <= cfg["rougeL"] <= 100
        saved = (run / "config.yaml").read_text()
        assert "group: kd_weight" in saved and "sweep-kd_weight" in saved
        weights.append(float(saved.split("kd_weight: ")[1].split()[0]))
        assert steps(run) == [2, 4, 6]
    assert weights == [1.0, 0.5]
    ids = [(run / "wandb_id.txt").read_text().strip() for run in runs]
    assert len(set(ids)) == 2  # two W&B runs, even though the jobs started together
    for run, run_id in zip(runs, ids, strict=True):
        assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    # Each job ran as its own SLURM job: submitit kept one folder per job id.
    assert len(list((sweep / ".submitit").iterdir())) >= 2


def _squeue(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def test_a_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    """``scontrol requeue`` kills the running job and queues it again: it must continue from
    its last checkpoint (no optimizer step repeated) and end exactly where an uninterrupted
    run ends."""
    name = f"kdexp-requeue-{os.getpid()}-{time.time_ns() % 10**6}"
    # ~12 steps/s on one core: the 70 steps after the first checkpoint leave the requeue ~6 s
    longer = [*FAST_WANDB, "train.max_steps=80", "train.save_every=10", "train.log_every=5"]
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "kdexp", "train", "-m", "seed=3", *LAUNCH, *longer, f"hydra.launcher.name={name}",
            f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    launcher = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    run = sweep / "0"
    try:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "step_0000010").is_dir():
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            assert time.time() < deadline, "the job never wrote its first checkpoint"
            time.sleep(0.2)
        jobs = _squeue(name)
        assert len(jobs) == 1 and jobs[0][1] == "RUNNING", jobs
        subprocess.run(["scontrol", "requeue", jobs[0][0]], check=True)
        # SLURM holds a requeued job back for a while (Reason=BeginTime); let it start at once.
        while _squeue(name) and _squeue(name)[0][1] != "PENDING":
            assert time.time() < deadline, _squeue(name)
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={jobs[0][0]}", "StartTime=now"], check=True)
        out, _ = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        subprocess.run(["scancel", "-n", name], capture_output=True)
    assert launcher.returncode == 0, out[-3000:]
    log = (run / "train.log").read_text()
    assert "requeued by SLURM" in log and "resumed from" in log, log[-2000:]
    # The same W&B run before and after the requeue: one id, two offline segments of it.
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    logged = steps(run)
    assert logged == sorted(set(logged)) and logged[-1] == 80  # nothing logged twice

    plain = tmp_path / "plain"
    kdexp("train", "seed=3", "train.num_threads=1", *longer, "logger=none", f"hydra.run.dir={plain}", cwd=tmp_path)
    assert steps(plain) == logged
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(plain / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(run / "results.json")["rougeL"] == read_json(plain / "results.json")["rougeL"]


def test_two_tasks_of_one_slurm_job_train_as_one_run(slurm, tmp_path):
    """``hydra.launcher.tasks_per_node=2``: submitit starts two tasks, kdexp exports
    torch.distributed's variables from SLURM's, and the tasks join (gloo on CPU) into one DDP
    run that matches a single process with the same global batch."""
    from tests.smoke.test_distributed import QUICK
    from tests.smoke.test_distributed import steps as train_steps

    args = [*QUICK, "method=kd", "train.batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2"]
    sweep = tmp_path / "sweep"
    kdexp("train", "-m", *LAUNCH, "hydra.launcher.tasks_per_node=2", *args, f"hydra.sweep.dir={sweep}",
          cwd=tmp_path, timeout=900)
    kdexp("train", *args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert "training on 2 processes (cpu, DDP over gloo)" in (sweep / "0" / "train.log").read_text()
    assert len(list((sweep / ".submitit").glob("*/*_1_log.out"))) == 1  # task 1 ran too
    two, one = train_steps(sweep / "0"), train_steps(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))  # one record, not two
    for a, b in zip(one, two, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(sweep / "0" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
