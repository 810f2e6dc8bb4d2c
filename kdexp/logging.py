"""Metrics to the run directory (``metrics.jsonl``) and, optionally, to Weights & Biases.

    logger = make_logger(cfg, run_dir, is_main=accelerator.is_main_process)
    logger.log({"loss": 1.2}, step=10)
    logger.finish()

Every process gets an object with the same methods; non-main processes get a ``NullLogger``,
so the training loop never asks whether logging is on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class NullLogger:
    """Accepts everything, records nothing."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def media(self, images: Mapping[str, Path], tables: Mapping[str, tuple[list[str], list[list[Any]]]]) -> None:
        """Figures (PNG files) and tables ``(columns, rows)`` for the dashboard."""

    def finish(self) -> None:
        pass


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf; keep them visible
    return value


class RunLogger(NullLogger):
    """Appends one JSON line per ``log`` call to ``metrics.jsonl``; mirrors to W&B if enabled."""

    def __init__(self, run_dir: Path, wandb_run: Any = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = wandb_run
        self.start = time.time()

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (by a run that died after its last checkpoint)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time() - self.start, 3),
               **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb(lambda run: run.log({k: _jsonable(v) for k, v in metrics.items()}, step=step))

    def _wandb(self, call) -> None:
        """Send to W&B; if W&B fails (its service killed, e.g. by the SIGTERM that SLURM sends
        to every process of a job it preempts), say so once and go on with metrics.jsonl."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as err:  # a logging side channel must not end the run
            log.warning("W&B logging failed (%s: %s); metrics go on to %s only",
                        type(err).__name__, err, self.path)
            self.wandb_run = None

    def summary(self, values: Mapping[str, Any]) -> None:
        def write(run) -> None:
            for k, v in values.items():
                run.summary[k] = _jsonable(v)

        self._wandb(write)

    def media(self, images: Mapping[str, Path], tables: Mapping[str, tuple[list[str], list[list[Any]]]]) -> None:
        if self.wandb_run is None:
            return
        import wandb

        payload: dict[str, Any] = {k: wandb.Image(str(p)) for k, p in images.items()}
        payload.update({k: wandb.Table(columns=list(c), data=[list(r) for r in rows])
                        for k, (c, rows) in tables.items()})
        self._wandb(lambda run: run.log(payload))

    def finish(self) -> None:
        """End the W&B run; instead of W&B's summary block, one line: where the run is."""
        run = self.wandb_run
        where = _where(run) if run is not None else None
        self._wandb(lambda run: run.finish())
        if where and self.wandb_run is not None:
            print(f"W&B: {where}", flush=True)
        self.wandb_run = None


def _where(run: Any) -> str | None:
    """Where a W&B run is and how to sync it, in one line (None if W&B does not say)."""
    try:
        if getattr(run, "offline", False) or run.settings.mode == "offline":
            return f"offline run {run.id}; upload it with `wandb sync {run.settings.sync_dir}`"
        return f"run {run.id} at {run.url}" if run.url else None
    except Exception:  # a side channel: never fail the run over a message
        return None


def wandb_mode(requested: str) -> str:
    """``auto`` -> online when an API key is known (env or ``wandb login``), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _start_wandb(cfg: DictConfig, run_dir: Path, job_type: str):
    import wandb

    lcfg = cfg.logger
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    mode = wandb_mode(lcfg.mode)
    run = wandb.init(
        project=lcfg.project, entity=lcfg.entity, group=lcfg.group, tags=list(lcfg.tags or []),
        job_type=lcfg.job_type or job_type, name=lcfg.run_name, dir=str(run_dir), mode=mode,
        id=run_id, resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
        reinit="finish_previous", settings=wandb.Settings(quiet=True),  # no summary block at the end
    )
    log.debug("W&B run %s (%s mode)", run_id, mode)  # W&B says where at the start, finish() at the end
    return run


def make_logger(cfg: DictConfig, run_dir: Path, is_main: bool = True, job_type: str = "train"):
    """The logger for this process: ``RunLogger`` (+ W&B unless ``logger=none``) or ``NullLogger``."""
    if not is_main:
        return NullLogger()
    wandb_run = _start_wandb(cfg, Path(run_dir), job_type) if cfg.logger.name == "wandb" else None
    return RunLogger(Path(run_dir), wandb_run)
