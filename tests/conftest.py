"""Shared helpers: run the real ``kdexp`` CLI, compose configs, fast overrides for tiny runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every kdexp run of the tests, in-process or not: nothing may reach the model or dataset hub,
# W&B stays offline and quiet, no progress bars (set before transformers and tqdm are imported).
RUN_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "TQDM_DISABLE": "1"}
os.environ.update(RUN_ENV)

from kdexp.models import ASSETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast run on the bundled models: a few steps, a small toy split, two eval seeds, the
# student alone evaluated at the end (the tests of the teacher's evaluation ask for it).
FAST = [
    "logger=none", "train.max_steps=6", "train.log_every=2", "train.save_every=3",
    "data.toy.n_train=96", "data.toy.n_valid=16", "data.toy.n_test=12",
    "eval.seeds=[10,20]", "eval.max_new_tokens=24", "train.batch_size=8", "train.micro_batch_size=4",
    "eval.teacher=false",
]


# Every test belongs to one tier (a marker, set from its file): `pytest -m unit`, `-m "not slurm"`.
TIERS = {"unit": "unit", "test_configs.py": "config", "test_bad_inputs.py": "config",
         "test_distributed.py": "distributed", "test_sharded.py": "distributed", "integration": "slurm",
         "test_benchmarks.py": "bench", "test_reproduce_cli.py": "bench", "smoke": "smoke"}


def tier(path: Path) -> str:
    """The tier of a test file: its own name's, else its folder's."""
    parts = Path(path).relative_to(ROOT / "tests").parts
    return TIERS.get(parts[-1]) or TIERS[parts[0]]


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        item.add_marker(tier(Path(str(item.fspath))))


def kdexp(*args: str, cwd: Path, env: dict[str, str | None] | None = None, check: bool = True,
          timeout: int = 300, nproc: int = 1, own_process: bool = False) -> subprocess.CompletedProcess:
    """``kdexp ARGS`` in ``cwd``: its exit status, stdout and stderr; on failure show its output.

    It runs in this process (:func:`kdexp.cli.main` under :func:`kdexp.api.isolated`: the real
    command line code, without paying a Python start and the torch import per call), unless
    it needs a process of its own: ``nproc`` > 1 (under ``torchrun --standalone``, one thread
    per process), a fault injection that kills the process (``KDEXP_KILL_AT_STEP``), or
    ``own_process=True`` (the tests of the command line's contract as a program). ``env``
    adds variables to the environment; a ``None`` value removes one.
    """
    if nproc == 1 and not own_process and "KDEXP_KILL_AT_STEP" not in (env or {}):
        proc = _in_process(args, cwd, env)
    else:
        proc = _subprocess(args, cwd, env, timeout, nproc)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdexp {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def _in_process(args, cwd, env) -> subprocess.CompletedProcess:
    from kdexp import api, cli

    out, err = io.StringIO(), io.StringIO()
    status = 0
    with api.isolated(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(list(args))
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return subprocess.CompletedProcess(["kdexp", *args], status, out.getvalue(), err.getvalue())


def _subprocess(args, cwd, env, timeout, nproc) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **RUN_ENV}
    launcher = []
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        full_env["OMP_NUM_THREADS"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run([sys.executable, *launcher, "-m", "kdexp", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def teacher_available() -> None:
    if not (ASSETS / "tiny-teacher" / "model.safetensors").is_file():
        pytest.fail("the bundled teacher is missing: run `make teacher`")


@pytest.fixture
def compose():
    """``compose(overrides) -> cfg``: the composed ``conf/config.yaml``, nothing loaded."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdexp.config import conf_dir, register_resolvers

    register_resolvers()

    def run(overrides: list[str] | None = None, hydra: bool = False):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="test"):
            return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=hydra)

    return run


def logged(run):
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timings = ("time", "train/tokens_per_s", "train/teacher_s")  # wall-clock, not the run
    return [{k: v for k, v in r.items() if k not in timings} for r in rows]
