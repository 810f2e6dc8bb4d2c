"""Where a method's training sequences come from.

The loop hands a source the dataset indices of each micro-batch (this process's share of the
seeded permutation) and trains on the examples it returns: dataset references, teacher
outputs, student outputs, replayed outputs, or a mixture. A source may also act after each
optimizer step (``after_step``) or validation (``after_validation``), report ``metrics()``,
and keep state that is checkpointed with the run (``state_dict`` / ``load_state_dict``).
Every decision a source makes comes from :meth:`Context.uniform`, shared by all processes.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdexp.data.encode import Example
from kdexp.errors import UserError
from kdexp.methods.context import Context
from kdexp.rollout import RolloutSpec

log = logging.getLogger(__name__)


class Source:
    """Dataset references, as they are (SFT, supervised KD)."""

    needs_teacher = False  # the source itself runs the teacher (teacher outputs, mixed sampling)
    teacher_generates_only = False  # ... only to generate responses (a served teacher can)
    validates_first = False  # wants a validation before the first step (its after_validation at step 0)
    changes_when_drawn = True  # drawing a step's micro-batches can change its state (kept aside for a failing teacher)

    def setup(self, ctx: Context, resumed: bool) -> None:
        """Once, before the first step (``resumed``: the state was just loaded from a checkpoint)."""

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        return [ctx.train[i] for i in indices]

    def after_step(self, ctx: Context, step: int, values: Mapping[str, float]) -> None:
        """After optimizer step ``step`` with its term values (token means over all processes)."""

    def after_validation(self, ctx: Context, step: int, valid_loss: float) -> None:
        """After a validation at ``step``; ``valid_loss`` is the same on every process."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class TeacherOutputs(Source):
    """The teacher's responses instead of the references: generated once for every training
    prompt and cached on disk (``live=False``, SeqKD), or sampled for each micro-batch."""

    needs_teacher = True
    teacher_generates_only = True

    def __init__(self, live: bool = False, spec: RolloutSpec | None = None):
        self.live, self.spec = live, spec
        self.outputs: list[Example] = []

    def setup(self, ctx: Context, resumed: bool) -> None:
        if not self.live:
            self.outputs = ctx.cached_teacher_outputs(self.spec or ctx.spec)

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        if self.live:
            return ctx.micro_rollout([ctx.train[i] for i in indices], "teacher", step, micro, model="teacher",
                               spec=self.spec)
        return [self.outputs[i] for i in indices]


class OnPolicy(Source):
    """Student outputs with probability ``p(step)``, else ``off`` (dataset or teacher outputs).

    ``per_sequence=False``: one decision per micro-batch, shared by all processes (GKD's
    ``lmbda``, Agarwal et al. ICLR 2024, Alg. 1). ``per_sequence=True``: one decision per
    sequence of the global micro-batch (ImitKD, Lin et al. EMNLP 2020, Alg. 1).
    """

    def __init__(self, p: Callable[[int, int], float], off: Source, per_sequence: bool = False):
        self.p, self.off, self.per_sequence = p, off, per_sequence
        self.needs_teacher, self.teacher_generates_only = off.needs_teacher, off.teacher_generates_only
        self.drawn, self.generated = 0, 0

    def setup(self, ctx: Context, resumed: bool) -> None:
        self.off.setup(ctx, resumed)

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        p = self.p(step, ctx.max_steps)
        base = self.off.micro_batch(ctx, indices, step, micro)
        if self.per_sequence:
            draws = ctx.uniform("on-policy", step, micro, n=len(indices) * ctx.world)
            mine = draws[ctx.rank * len(indices):(ctx.rank + 1) * len(indices)]
            chosen = [j for j, u in enumerate(mine) if u < p]
        else:
            chosen = list(range(len(indices))) if ctx.uniform("on-policy", step, micro) < p else []
        self.drawn += len(indices)
        self.generated += len(chosen)
        if not chosen:
            return base
        fresh = ctx.micro_rollout([ctx.train[indices[j]] for j in chosen], "student", step, micro)
        for j, example in zip(chosen, fresh, strict=True):
            base[j] = example
        return base

    def metrics(self) -> dict[str, float]:
        return {"student_fraction": self.generated / max(self.drawn, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "generated": self.generated}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.drawn, self.generated = int(state["drawn"]), int(state["generated"])


def constant(value: float) -> Callable[[int, int], float]:
    return lambda step, total: value


def exponential_decay(base: float) -> Callable[[int, int], float]:
    """``1 - base ** (-step / total)``: the student share of ImitKD, whose data share
    ``beta = base ** (-step / total)`` decays from 1 to ``1 / base`` (Lin et al. 2020)."""
    return lambda step, total: 1.0 - base ** (-step / total)


class AdaptiveOffPolicy(Source):
    """DistiLLM's adaptive off-policy approach (Ko et al., ICML 2024, Sec. 3.2 and Alg. 1).

    ``phi`` (the probability of student-generated data) starts at ``init_threshold`` and rises
    by 0.1 (up to 1) after a validation whose loss exceeds the loss at the last rise (or, until
    the first rise, the loss before training: the loop validates at step 0 for this source, as
    the reference's ``finetune.py`` does) by ``loss_eps``. Each micro-batch draws one shared ``r ~ U(0, 1)``: fresh
    student outputs when ``r < s`` (``s = phi * (1 - step / total)`` for ``replay_ratio:
    decreasing``, ``phi * step / total`` for ``increasing``, ``phi / 2`` for ``constant``) or
    when ``r < phi`` and the replay buffer is not yet full; a sample of the buffer when
    ``r < phi``; the dataset otherwise. Fresh outputs are also pushed into the buffer (FIFO,
    ``capacity`` sequences).
    """

    RATIOS = ("decreasing", "increasing", "constant")
    validates_first = True

    def __init__(self, init_threshold: float, loss_eps: float, capacity: int, replay_ratio: str):
        self.phi, self.loss_eps, self.capacity, self.replay_ratio = init_threshold, loss_eps, capacity, replay_ratio
        self.buffer: deque[Example] = deque(maxlen=capacity)
        self.reference_loss: float | None = None
        self.counts = {"fresh": 0, "replay": 0, "data": 0}

    def fresh_threshold(self, step: int, total: int) -> float:
        if self.replay_ratio == "constant":
            return 0.5 * self.phi
        frac = step / total
        return self.phi * (frac if self.replay_ratio == "increasing" else 1.0 - frac)

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        r = ctx.uniform("adaptive-off-policy", step, micro)
        # "Full" is decided on the global count so that every process takes the same branch.
        full = len(self.buffer) >= self.capacity
        if r < self.fresh_threshold(step, ctx.max_steps) or (r < self.phi and not full):
            self.counts["fresh"] += 1
            fresh = ctx.micro_rollout([ctx.train[i] for i in indices], "student", step, micro)
            self.buffer.extend(fresh)
            return fresh
        if r < self.phi:
            self.counts["replay"] += 1
            picks = ctx.permutation(len(self.buffer), "replay", step, micro, ctx.rank)[:len(indices)]
            return [self.buffer[j] for j in picks]
        self.counts["data"] += 1
        return [ctx.train[i] for i in indices]

    def after_validation(self, ctx: Context, step: int, valid_loss: float) -> None:
        if self.reference_loss is None:
            self.reference_loss = valid_loss
        elif valid_loss >= self.reference_loss + self.loss_eps:
            self.phi = min(self.phi + 0.1, 1.0)
            self.reference_loss = valid_loss
            log.info("step %d: validation loss %.4f did not improve; student-generated share -> %.1f",
                     step, valid_loss, self.phi)

    def metrics(self) -> dict[str, float]:
        n = max(sum(self.counts.values()), 1)
        return {"phi": self.phi, "buffer": float(len(self.buffer)),
                **{f"{k}_fraction": v / n for k, v in self.counts.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi, "reference_loss": self.reference_loss, "counts": dict(self.counts),
                "buffer": [pack_example(e) for e in self.buffer]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.phi, self.reference_loss = float(state["phi"]), state["reference_loss"]
        self.counts = dict(state["counts"])
        self.buffer = deque((unpack_example(e) for e in state["buffer"]), maxlen=self.capacity)


def pack_example(e: Example) -> dict[str, Any]:
    return {"prompt_ids": e.prompt_ids, "response_ids": e.response_ids, "record": e.record,
            "origin": e.origin, "values": e.values}


def unpack_example(d: Mapping[str, Any]) -> Example:
    return Example(list(d["prompt_ids"]), list(d["response_ids"]), dict(d["record"]), d["origin"],
                   dict(d["values"]))


class Pregenerated(Source):
    """Student outputs for every training prompt, generated before training and used
    exclusively; regenerated with the latest student ``refresh`` times, evenly spaced (at
    steps ``total * k / (refresh + 1)``), the "update twice" recipe of Rang et al. (2025)."""

    def __init__(self, refresh: int):
        self.refresh = refresh
        self.outputs: list[Example] = []
        self.generations = 0

    def refresh_steps(self, total: int) -> list[int]:
        return [round(total * k / (self.refresh + 1)) for k in range(1, self.refresh + 1)]

    def setup(self, ctx: Context, resumed: bool) -> None:
        if not resumed:
            self._generate(ctx, 0)

    def _generate(self, ctx: Context, step: int) -> None:
        log.info("step %d: generating student outputs for %d training prompts", step, len(ctx.train))
        self.outputs = ctx.rollout_all(ctx.train, "sgo", self.generations, model="student", desc="student outputs")
        self.generations += 1

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        return [self.outputs[i] for i in indices]

    def after_step(self, ctx: Context, step: int, values: Mapping[str, float]) -> None:
        if step in self.refresh_steps(ctx.max_steps):
            self._generate(ctx, step)

    def metrics(self) -> dict[str, float]:
        return {"generations": float(self.generations)}

    def state_dict(self) -> dict[str, Any]:
        return {"generations": self.generations, "outputs": [pack_example(e) for e in self.outputs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generations = int(state["generations"])
        self.outputs = [unpack_example(e) for e in state["outputs"]]


class Contrastive(Source):
    """DistiLLM-2's pairs (Ko et al., ICML 2025): for every prompt of a micro-batch, the
    teacher's response (origin ``teacher``) and the student's (origin ``student``), both
    generated once before training, as the reference implementation does (``live=True``
    samples the student's on the fly instead)."""

    needs_teacher = True
    teacher_generates_only = True

    def __init__(self, spec: RolloutSpec | None, live: bool = False):
        self.teacher = TeacherOutputs(spec=spec)
        self.spec, self.live = spec, live
        self.student: list[Example] = []

    def setup(self, ctx: Context, resumed: bool) -> None:
        self.teacher.setup(ctx, resumed)
        if not self.live and not resumed:
            self.student = ctx.rollout_all(ctx.train, "distillm2-student", model="student", spec=self.spec,
                                           desc="student outputs")

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        teacher = self.teacher.micro_batch(ctx, indices, step, micro)
        if self.live:
            student = ctx.micro_rollout([ctx.train[i] for i in indices], "student", step, micro, spec=self.spec)
        else:
            student = [self.student[i] for i in indices]
        return teacher + student

    def state_dict(self) -> dict[str, Any]:
        return {"student": [pack_example(e) for e in self.student]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student = [unpack_example(e) for e in state["student"]]


def load_pt_corpus(path: str, tokenizer, max_length: int) -> list[Example]:
    """Plain text for a language-modelling term: a ``.jsonl`` file with a ``text`` field per
    line, or a ``.txt`` file with one document per line. Each document is cut to
    ``max_length`` tokens and trained on from its second token (origin ``pt``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"method.pt_data: {file} is not a file; give a .jsonl (a 'text' field per line) "
                        f"or a .txt file (one document per line)")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    try:
        texts = [json.loads(line)["text"] for line in lines] if file.suffix == ".jsonl" else lines
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"method.pt_data: {file} must have a 'text' field on every line ({err})") from None
    out = []
    for text in texts:
        ids = (tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        if len(ids) >= 2:
            out.append(Example(ids[:1], ids[1:], {"text": text}, origin="pt"))
    if not out:
        raise UserError(f"method.pt_data: {file} has no document of two tokens or more")
    return out
