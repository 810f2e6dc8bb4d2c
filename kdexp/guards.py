"""What guards the steps of a run: non-finite losses and gradients (:class:`NonFinite`), the
signals that ask a run to checkpoint and stop (:class:`StopSignals`), and the fault injection
the reliability tests use (:func:`fault_injection`)."""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from kdexp import checkpoint
from kdexp.errors import TrainingAborted

log = logging.getLogger(__name__)


class NonFinite:
    """The guard against NaN / inf: a step whose loss terms or gradient norm are not finite is
    skipped (no update, a warning); ``train.max_bad_steps`` consecutive ones abort the run.

    The loss terms are means over all processes and the gradients are already synchronized, so
    every rank reaches the same verdict. ``KDEXP_NAN_AT_ATTEMPT=3,4`` (tests) makes the loss of
    the 3rd and 4th step attempts (counting skipped ones) NaN.
    """

    def __init__(self, inject_at: str | None = None):
        self.attempt, self.consecutive, self.skipped = 0, 0, 0
        self.inject_at = {int(a) for a in inject_at.split(",")} if inject_at else set()
        self.last = ""

    def inject(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.attempt + 1 in self.inject_at else loss

    def check(self, parts: dict[str, float], norms: list, step: int) -> bool:
        """Whether this step attempt is bad (and must be skipped)."""
        self.attempt += 1
        bad = [k for k, v in parts.items() if not math.isfinite(v)]
        bad += [f"grad_norm[{i}]" for i, n in enumerate(norms) if n is not None and not math.isfinite(float(n))]
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive, self.skipped = self.consecutive + 1, self.skipped + 1
        self.last = f"step {step}: {', '.join(bad)} not finite"
        log.warning("%s; the step is skipped (%d in a row, %d in all)", self.last, self.consecutive, self.skipped)
        return True

    def abort_message(self, run_dir: Path) -> str:
        kept = checkpoint.list_checkpoints(run_dir)
        return (f"{self.consecutive} consecutive steps had a non-finite loss or gradient (train.max_bad_steps; "
                f"last: {self.last}); the run stops with its last good checkpoint "
                f"{'intact: ' + kept[-1].name if kept else 'none (none was written yet)'}: lower train.lr, "
                f"check the data, or train in float32")

    @staticmethod
    def check_weights(model: torch.nn.Module, step: int, run_dir: Path) -> None:
        """Never checkpoint non-finite weights (a finite step with a huge lr can make them)."""
        if not _all_finite(model):
            raise TrainingAborted(f"the weights are not finite after step {step}; nothing was saved, the "
                                  f"checkpoints in {checkpoint.checkpoint_dir(run_dir)} are the last good "
                                  f"ones: lower train.lr or raise train.warmup_steps")


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM sends before a time limit: ``--signal=USR1@120``;
    submitit asks for USR2) ask the loop to checkpoint after the current step and exit; the
    previous handlers are restored after the loop. With several processes the request is
    shared (one small all-reduce a step), so every rank stops after the same step.

    A handler that was there before (submitit's, which requeues the job on USR2) is called
    after the checkpoint: the requeued job resumes from it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {}
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning("received %s: checkpointing after this step, then exiting", signal.Signals(signum).name)

    def requested(self, accelerator: Accelerator) -> int:
        """The signal received by any process (0: none)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())

    def hand_over(self, signum: int) -> None:
        """Call the handler that was installed before ours for ``signum`` (it may exit)."""
        self.restore()
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, None)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)



def fault_injection(step: int) -> None:
    """``KDEXP_KILL_AT_STEP=N``: SIGKILL this process right after optimizer step N.

    For the tests that prove resumption: the process dies as a preempted job does, with no
    chance to clean up, between a step and its checkpoint.
    """
    at = os.environ.get("KDEXP_KILL_AT_STEP")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _all_finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite; over FSDP2's shards, the same verdict on every process."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.numel()]
    sharded = any(isinstance(p, DTensor) for p in params)
    ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in params)
    if sharded:
        import torch.distributed as dist

        flag = torch.tensor(float(ok), device=next(p.to_local() for p in params if isinstance(p, DTensor)).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok
