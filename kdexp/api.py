"""kdexp's commands in the current process: what ``kdexp COMMAND OVERRIDES`` does, as a call.

    from kdexp import api
    results = api.run("train", ["method=sft", "train.max_steps=20", "hydra.run.dir=runs/sft"])
    api.run("eval", ["model=runs/sft"])

``run`` checks the overrides exactly as the command line does (every problem at once, nothing
written), composes the config with Hydra, creates the run directory with its ``.hydra/``
record and log file, and runs the command's job. Where the command line prints one
``kdexp: error:`` line and exits, ``run`` raises :class:`kdexp.errors.UserError` (its
``status`` is the exit status); a stop on a signal raises :class:`kdexp.errors.Stopped`.

Each call is isolated: the environment, the working directory, ``sys.argv``, torch's thread
count, the root logger's handlers, accelerate's process state and any process group are
restored afterwards, so calls can follow each other in one process (tests, notebooks). Two
things stay with the command line: multirun sweeps and launchers (``-m``,
``hydra/launcher=slurm``), and DeepSpeed, which keeps process-wide communication state that a
finished run does not release (run ``deepspeed=`` configs as a program, one per process).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdexp.errors import UserError

# Each command's job: a function (cfg, run_dir), imported only when that command runs.
RUNNERS: dict[str, str] = {"train": "kdexp.train:run", "eval": "kdexp.jobs:run_eval",
                           "generate": "kdexp.jobs:run_generate", "analyze": "kdexp.analyze:run_analyze",
                           "compare": "kdexp.compare:run_compare",
                           "cache-teacher": "kdexp.teacher_cache:run_cache",
                           "serve-teacher": "kdexp.serve:run_serve", "osd": "kdexp.osd:run_osd"}


def job(command: str, cfg: Any, run_dir: Path, cwd: Path, existed: bool) -> Any:
    """Run ``command``'s job on a composed config in ``run_dir``. On a ``UserError`` the run
    directory is removed if the job created it and left nothing in it but Hydra's own files
    (``existed``: it was there before the command), then the error propagates."""
    quiet_libraries()
    module, name = RUNNERS[command].split(":")
    try:
        return getattr(importlib.import_module(module), name)(cfg, run_dir)
    except UserError:
        if not existed:
            resumed = bool(cfg.get("train", {}).get("resume"))
            discard_if_empty(run_dir, resumed, cwd)
        raise


class _NoGpuNotice(logging.Filter):
    """DeepSpeed's "Setting accelerator to CPU" warning, which it prints whenever it is imported
    (accelerate and transformers import it to look for it) on a machine without a GPU: expected
    there, and not about the run; kept where a GPU exists (it then means detection failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "accelerator to CPU" not in record.getMessage():
            return True
        import torch
        return torch.cuda.is_available()


def quiet_libraries() -> None:
    """Keep the job log about the run: libraries' routine INFO lines go, and notices that are
    not about the user's run (kdexp checks lengths itself, so the tokenizer's warning that a
    text is longer than its limit is noise)."""
    for name in ("accelerate", "absl", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # accelerate warns on every checkpoint that tied embeddings are saved once: expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    deepspeed = logging.getLogger("DeepSpeed")  # its own logger, created when DeepSpeed is imported
    if not any(isinstance(f, _NoGpuNotice) for f in deepspeed.filters):
        deepspeed.addFilter(_NoGpuNotice())


def discard_if_empty(run_dir: Path, resumed: bool, cwd: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's own files, and the folders above it
    (``runs/DATE``) it leaves empty, up to ``cwd``."""
    if resumed or not run_dir.is_dir():
        return
    hydra_files = {".hydra", "config.yaml"} | {p.name for p in run_dir.glob("*.log")}
    if all(p.name in hydra_files for p in run_dir.iterdir()):
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        parent, cwd = run_dir.resolve().parent, cwd.resolve()
        while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def run(command: str, overrides: Sequence[str] = (), cwd: str | Path | None = None,
        env: Mapping[str, str | None] | None = None) -> Any:
    """Run ``kdexp COMMAND OVERRIDES`` in this process and return its job's result (``train``:
    the results dict). ``cwd``: the working directory to run in (relative paths, ``runs/``);
    ``env``: variables to set (``None`` removes one) for the call only."""
    from kdexp import cli, preflight

    if command not in RUNNERS:
        from kdexp.errors import unknown_choice

        raise unknown_choice("command", command, RUNNERS)
    with isolated(cwd, env):
        args = cli.command_args(command, list(overrides))
        existing = preflight.preflight(args, preflight.CHECKED[command])
        return _hydra_run(command, args, existing)


def _hydra_run(command: str, args: list[str], existing: set[str]) -> Any:
    """Hydra's single run (what ``hydra.main`` does without ``-m``): compose, create the run
    directory and its ``.hydra/`` record, configure logging, call the job."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from kdexp.config import conf_dir

    cwd = Path.cwd()

    def task(cfg) -> Any:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return job(command, cfg, run_dir, cwd, str(run_dir.resolve()) in existing)

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=command):
        hydra = GlobalHydra.instance().hydra
        ret = hydra.run(config_name="config", task_function=task,
                        overrides=[*overrides, f"hydra.job.name={command}"])
    return ret.return_value  # re-raises the job's exception


@contextmanager
def isolated(cwd: str | Path | None = None, env: Mapping[str, str | None] | None = None) -> Iterator[None]:
    """Run a command as if in a fresh process, then put back what it changed: the environment
    (DeepSpeed sets RANK / WORLD_SIZE), the working directory, ``sys.argv``, torch's thread
    count, accelerate's shared state and a process group it initialized."""
    import torch

    saved_env, saved_cwd, saved_argv = dict(os.environ), Path.cwd(), list(sys.argv)
    threads = torch.get_num_threads()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for key, value in (env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        for handler in root.handlers:  # Hydra's console and run-directory log file
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        _reset_distributed_state()


def _reset_distributed_state() -> None:
    """Forget accelerate's singleton state and any process group, as a new process would."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
    except ImportError:  # accelerate not imported yet: nothing to reset
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


__all__ = ["RUNNERS", "discard_if_empty", "isolated", "job", "run"]
