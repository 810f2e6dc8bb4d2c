"""One optimizer step, and what orders the steps: the resumable batch stream, the step
counter and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig

from kdexp import engine as engines
from kdexp.errors import UserError

log = logging.getLogger(__name__)


class BatchStream:
    """Seeded, resumable micro-batches: a fresh permutation per epoch, this process's share.

    Each global micro-batch holds ``micro_batch_size * world`` examples; process ``rank`` takes
    its slice. The position ``(epoch, index)`` is checkpointed, so a resumed run sees exactly
    the batches the uninterrupted run would have seen.
    """

    def __init__(self, n: int, micro_batch_size: int, world: int, rank: int, seed: int):
        self.n, self.mbs, self.world, self.rank, self.seed = n, micro_batch_size, world, rank, seed
        self.per_epoch = self.check(n, micro_batch_size, world)
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    @staticmethod
    def check(n: int, micro_batch_size: int, world: int) -> int:
        """Micro-batches per epoch; at least one, or a one-line error."""
        if n < micro_batch_size * world:
            raise UserError(f"the training split has {n} examples, fewer than one micro-batch of "
                            f"{micro_batch_size} x {world} processes; lower train.micro_batch_size")
        return n // (micro_batch_size * world)

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        start = (self.index * self.world + self.rank) * self.mbs
        self.index += 1
        return self._order[start:start + self.mbs]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


class Progress:
    """The optimizer step counter and the run's totals (tokens trained on, training seconds),
    checkpointed with the rest of the state so that a resumed run reports the whole run."""

    def __init__(self) -> None:
        self.step, self.tokens, self.seconds = 0, 0, 0.0

    def state_dict(self) -> dict[str, float]:
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.step = int(state["step"])
        # checkpoints written before the totals were kept (2026-12-04) start them at 0
        self.tokens, self.seconds = int(state.get("tokens", 0)), float(state.get("seconds", 0.0))



def lr_lambda(warmup: int, total: int, min_ratio: float, kind: str = "linear"):
    """Linear warmup to the peak over ``warmup`` steps, then ``kind``: a linear or cosine decay
    to ``min_ratio`` x peak at ``total``, or constant (MiniLLM's PPO stage)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(min_ratio, 1.0 - (1.0 - min_ratio) * progress)

    return factor


def schedule(train: DictConfig, n_examples: int) -> tuple[int, int]:
    """``(max_steps, warmup_steps)`` of a run on ``n_examples`` training examples.

    ``train.epochs``, when set, replaces ``train.max_steps`` with ``epochs x n_examples /
    batch_size`` steps, rounded up; ``train.warmup_ratio``, when set, replaces
    ``train.warmup_steps`` with that fraction of the steps, rounded (the papers' "warmup 3 %").
    """
    steps = int(train.max_steps)
    if train.get("epochs") is not None:
        steps = max(1, math.ceil(float(train.epochs) * n_examples / int(train.batch_size)))
    warmup = int(train.warmup_steps)
    if train.get("warmup_ratio") is not None:
        warmup = round(float(train.warmup_ratio) * steps)
    return steps, warmup



class Step:
    """One optimizer step over ``accum`` micro-batches, gradients exactly those of one big batch.

    Every micro-batch's loss is divided by the token count of the whole step over all
    processes (per term: a term may cover some rows only); DDP then averages gradients over
    the processes, which the factor undoes. After the backward passes: the step's term values
    (token means over all processes), the sample-weight normalization, clipping (one norm per
    parameter group; DeepSpeed clips inside its own step), and the non-finite guard's verdict.
    The teacher (:class:`kdexp.teachers.Teacher`) gives the logits, whatever its kind. An MoE
    student's load-balancing loss (``router``, :class:`kdexp.models.RouterLoss`) is a batch
    statistic, not a token sum: each micro-batch's value counts equally, so the step's
    gradient is that of its mean over the micro-batches and the processes (logged as
    ``router_aux``, unweighted).
    """

    def __init__(self, cfg: DictConfig, accelerator, engine: torch.nn.Module, teacher, objective,
                 groups: list[list[torch.nn.Parameter]], optimizer, guard, router=None):
        self.t, self.accelerator, self.engine, self.teacher = cfg.train, accelerator, engine, teacher
        self.objective, self.groups, self.optimizer, self.guard = objective, groups, optimizer, guard
        self.router = router
        self.world = accelerator.num_processes
        self.fused = self.choose_path()

    def choose_path(self) -> bool:
        """Whether the loss takes the fused path (``loss.fused``: auto takes it wherever it can;
        true refuses to run without it; false keeps the plain or chunked path)."""
        mode = self.objective.fused_mode
        if mode == "false":
            return False
        why = ("the objective has terms other than CE and divergences" if not self.objective.fusable
               else self.teacher.fusable(self.engine))
        if why and mode == "true":
            raise UserError(f"loss.fused=true, but the fused path cannot run: {why}; set loss.fused=auto")
        if self.accelerator.is_main_process:
            log.info("loss: %s", "fused (hidden states x LM head, a chunk of positions at a time)" if not why
                     else f"plain path ({why})")
        return not why

    def counts(self, batches: list[dict[str, torch.Tensor]]) -> tuple[int, dict[str, float]]:
        """The step's valid target tokens over all processes: in all, and per term."""
        from kdexp.losses.objective import IGNORE_INDEX

        local = {"all": sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)}
        for b in batches:
            for key, n in self.objective.token_counts(b).items():
                local[key] = local.get(key, 0) + n
        counts = {k: self.accelerator.reduce(torch.tensor(float(v), device=self.accelerator.device), "sum").item()
                  for k, v in local.items()}
        return int(counts.pop("all")), counts

    def __call__(self, batches: list[dict[str, torch.Tensor]], step: int):
        """Backward over the micro-batches, then normalize, clip and judge: ``(n_tokens, the
        reduced term values, the gradient norms, bad)``; a bad step has its gradients dropped."""
        n_tokens, counts = self.counts(batches)
        accelerator, objective = self.accelerator, self.objective
        step_parts: dict[str, float] = {}
        for batch in batches:
            with accelerator.accumulate(self.engine):  # no gradient sync before the step's last
                shares = {k: n / self.world for k, n in counts.items()}
                if self.fused:
                    student, teacher = self.teacher.forward_fused(self.engine, batch, objective.needs_teacher)
                    heads = [getattr(h, name, None) for h in (student, teacher) for name in ("weight", "bias")]
                    # each chunk's logits as the model's head makes them; ZeRO-3 gathers the heads;
                    # fp16: gradients seeded at the engine's loss scale, as the plain path's backward
                    with engines.gathered_params(*heads), accelerator.autocast():
                        loss, parts = objective.fused(student, teacher, batch, shares,
                                                      engines.loss_scale(accelerator, self.engine))
                else:
                    student_logits, teacher_logits = self.teacher.forward(self.engine, batch, objective.needs_teacher)
                    loss, parts = objective(student_logits, teacher_logits, batch, shares)
                if self.router is not None:
                    aux = self.router.take()
                    loss = loss + self.router.weight * aux / len(batches)
                    parts = {**parts, "router_aux": aux.detach() / len(batches)}
                loss = self.guard.inject(loss)
                # The engines divide by the accumulation count; the loss is already a share
                # of the whole step's token mean.
                accelerator.backward(loss * len(batches))
            for k, v in parts.items():
                step_parts[k] = step_parts.get(k, 0.0) + v.item()
        # The step's term values, token means over all processes: logged, and fed to the
        # objective's running scales and the method's hooks (the same numbers on every rank).
        reduced = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item()
                   for k, v in step_parts.items()}
        # Sample weights are normalized over the whole step: the micro-batches used raw ones.
        factor = objective.normalize_step(reduced)
        if factor != 1.0:
            for group in self.groups:
                for p in group:
                    if p.grad is not None:
                        p.grad.mul_(factor)
        norms = self.clip()
        bad = self.guard.check(reduced, norms, step + 1)  # the same verdict on every rank
        if bad:  # skipped: no update, the step is taken again with the next batches
            self.optimizer.zero_grad(set_to_none=True)
            engines.skipped(accelerator)
        return n_tokens, reduced, norms, bad

    def clip(self) -> list:
        """Clip each parameter group to ``train.max_grad_norm``; their norms before clipping."""
        return engines.clip(self.accelerator, self.groups, float(self.t.max_grad_norm))
