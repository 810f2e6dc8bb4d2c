"""Merge-of-Thought (``teachers.rule=mot``): teacher-specific branches of the student, merged.

    kdexp train teachers.rule=mot teachers.names=[tiny,tiny-b] teachers.branch_steps=50

Shen, Qin, Huang, Chen, Hu, Zhuang, Lu, Chen and Zhao, "Merge-of-Thought Distillation"
(arXiv 2509.08814, 2025, Sec. 3 and Algorithm 1): every round starts from the base student
``theta^(t-1)``; each teacher ``k`` gets a branch, ``theta_k^(t)``, trained from the base for
``R`` steps on that teacher's supervision alone; the round's student is their uniform average in
weight space, ``theta^(t) = (1/K) sum_k theta_k^(t)``, the base of the next round. The paper
trains each branch by SFT on its teacher's chain-of-thought texts; here a branch trains with the
run's method and divergence against that teacher's distributions, so MoT applies to every
method that reads a teacher's logits on the dataset's or the student's sequences.

The branches run one after another in the one training loop (``train.max_steps`` = rounds x K x
R optimizer steps). As independent fine-tuning runs from the same base would, the branches of a
round train on the same batches (the data stream is rewound at each branch's start), at the same
learning rates (the schedule runs over one branch per round, rounds x R steps with
``train.warmup_steps / K`` of warmup: :func:`branch_step`), each from a fresh optimizer state.
What the method itself carries from step to step (TAID's interpolation, DistiLLM's adaptive
mixing, an objective's running scales) goes on across branches and merges. Between two branches
of a round the student's weights are the base again, so a validation or checkpoint there sees
the base; a checkpoint holds the base, the sum of the round's finished branches and the stream's
position at the round's start, so a resumed run goes on exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdexp.errors import UserError
from kdexp.methods.sources import Source


class MergeOfThought(Source):
    """The hook that switches branches and merges them (one of the plan's hooks)."""

    changes_when_drawn = False  # it acts after the optimizer step only: nothing to put back when drawing fails

    def __init__(self, teachers: int, branch_steps: int):
        self.k, self.r = int(teachers), int(branch_steps)
        self.base: list[torch.Tensor] = []   # the round's starting weights
        self.total: list[torch.Tensor] = []  # the sum of the round's finished branches (float32)
        self.params: list[torch.nn.Parameter] = []
        self.optimizer = None
        self.active = 0  # the branch of the next step
        self.stream = None
        self.rewind: dict[str, Any] = {}  # the data stream's state at the round's start

    def schedule_step(self, step: int) -> int:
        """The step of the learning-rate schedule that optimizer step ``step`` takes (:func:`branch_step`)."""
        return branch_step(step, self.k, self.r)

    def branch(self, step: int) -> int:
        """The teacher (index into ``teachers.names``) that optimizer step ``step`` (0-based) trains on."""
        return (step // self.r) % self.k

    def setup(self, ctx, resumed: bool) -> None:
        if ctx.max_steps % (self.k * self.r):
            raise UserError(mot_steps_problem(ctx.max_steps, self.k, self.r))
        self.params = [p for p in ctx.accelerator.unwrap_model(ctx.student).parameters() if p.requires_grad]
        self.optimizer, self.stream = ctx.optimizer, ctx.stream
        if ctx.accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU"):
            raise UserError(f"teachers.rule=mot resets whole weights and optimizer state between branches, which "
                            f"{ctx.accelerator.distributed_type.value} shards: train it with DDP or one process")
        if resumed:  # the base and the sums came with the checkpoint (accelerate loads them on the CPU)
            device = self.params[0].device
            self.base, self.total = ([t.to(device) for t in ts] for ts in (self.base, self.total))
        else:
            self._start_round()
        ctx.teacher.active = self.active

    def _start_round(self) -> None:
        self.rewind = self.stream.state_dict()
        self.base = [p.detach().clone() for p in self.params]
        self.total = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self.params]

    @torch.no_grad()
    def after_step(self, ctx, step: int, values: Mapping[str, float]) -> None:
        self.active = ctx.teacher.active = self.branch(step)  # the next step's teacher
        if step % self.r:
            return
        for total, p in zip(self.total, self.params, strict=True):
            total += p.detach()
        if self.branch(step - 1) < self.k - 1:  # the next branch starts from the base, on the same batches
            for base, p in zip(self.base, self.params, strict=True):
                p.copy_(base)
            self.stream.load_state_dict(self.rewind)
        else:  # the round's last branch: merge, and the merge is the next round's base
            for total, p in zip(self.total, self.params, strict=True):
                p.copy_(total / self.k)
            self._start_round()
        self.optimizer.state.clear()  # a branch starts as a fine-tuning run: a fresh AdamW state

    def metrics(self) -> dict[str, float]:
        return {"mot_branch": float(self.active)}  # logged before after_step: the branch of the step just taken

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "rewind": self.rewind, "base": [t.cpu() for t in self.base],
                "total": [t.cpu() for t in self.total]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.active, self.rewind = int(state["active"]), dict(state["rewind"])
        self.base, self.total = list(state["base"]), list(state["total"])


def branch_step(step: int, teachers: int, branch_steps: int) -> int:
    """Optimizer step ``step``'s place in the schedule of one branch per round: the branches of
    a round take the same learning rates, those of a run of ``rounds x branch_steps`` steps."""
    return (step // (teachers * branch_steps)) * branch_steps + step % branch_steps


def branch_schedule(teachers: int, warmup: int, total: int) -> tuple[int, int]:
    """``(warmup, total)`` of the schedule that :func:`branch_step` walks: a K-th of the run's."""
    return (0 if warmup == 0 else max(1, round(warmup / teachers))), max(1, total // teachers)


def mot_steps_problem(max_steps: int, teachers: int, branch_steps: int) -> str:
    """The one line for a ``train.max_steps`` that ends inside a round."""
    round_steps = teachers * branch_steps
    fit = max(round_steps, round(max_steps / round_steps) * round_steps)
    return (f"teachers.rule=mot trains rounds of {teachers} branches x {branch_steps} steps (teachers.branch_steps), "
            f"so train.max_steps={max_steps} would end inside a round: use a multiple of {round_steps}, e.g. "
            f"train.max_steps={fit}")


__all__ = ["MergeOfThought", "branch_schedule", "branch_step", "mot_steps_problem"]
