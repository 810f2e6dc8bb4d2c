"""Several teachers combined into one target (``teachers.rule``): frozen models in this process,
teachers behind a server (a ``teachers.names`` entry ``http://HOST:PORT``) or a teacher's top-k
cache (``cache:NAME``, built by ``kdexp cache-teacher teacher=NAME loss.temperature=1``).

    kdexp train teachers.rule=mixture teachers.names=[tiny,runs/other/final] teachers.weights=[0.7,0.3]
    kdexp train teachers.rule=route teachers.names=[tiny,runs/other/final] teachers.route_key=family \\
        'teachers.route_map={fact: tiny, arith: runs/other/final}'
    kdexp train teachers.rule=relative teachers.names=[runs/finetuned/final,tiny] teachers.alpha=0.5
    kdexp train teachers.rule=mot teachers.names=[tiny-b,tiny-c] teachers.branch_steps=50   # kdexp.teachers.merge
    kdexp train teachers.rule=mixture teachers.names=[tiny-b,http://127.0.0.1:8000]           # one of them served

At every position the teachers' distributions (at temperature 1, on the tokenizer's tokens) are
combined by :mod:`kdexp.teachers.combine` (``mixture``: a weighted average; ``relative``: the
first teacher corrected by the ratio of the raw student, ``teachers.raw_student`` or the
student as loaded, to the raw teacher, the second; ``route``: each example's own teacher, named
by its record's ``teachers.route_key`` field, through ``teachers.route_map`` when the field's
values are not teacher names, and ``teachers.route_default`` for the values it does not name);
``mot`` (Merge-of-Thought) trains on one teacher at a time, the branch's
(:mod:`kdexp.teachers.merge`). The result is read by the loss as one teacher's logits, so every
divergence and every method that reads the teacher's distributions on the dataset's or the
student's sequences applies. The combined target is built whole (``[B, T, V]``) and given to the
fused path as dense logits; a served member's top-k and tail (``teacher.top_k``) are densified
first, its other positions (prompt, padding) uniform, which no loss reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from kdexp.errors import UserError
from kdexp.teachers import combine
from kdexp.teachers.base import Logits, Teacher, logits_of

RULES = (*combine.RULES, "mot")  # mot combines students, not distributions: kdexp.teachers.merge


class MultiTeacher(Teacher):
    """Teachers whose distributions a rule combines per position: frozen models in this process,
    served teachers (:class:`~kdexp.teachers.server.ServerTeacher`, asked per micro-batch) or
    top-k caches (:class:`~kdexp.teachers.cache.CachedTeacher`)."""

    kind = "multi"

    def __init__(self, accelerator, vocab: int | None, names: Sequence[str], members: Sequence[torch.nn.Module | Teacher],
                 rule: str, weights: Sequence[float] | None = None, alpha: float = 1.0,
                 raw_student: torch.nn.Module | None = None, route: Mapping[str, Any] | None = None):
        super().__init__(accelerator, vocab)
        if rule not in RULES:
            raise UserError(f"teachers.rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.names, self.rule, self.alpha = list(names), rule, float(alpha)
        self.members = [m if isinstance(m, Teacher) else m.requires_grad_(False).eval().to(accelerator.device)
                        for m in members]
        self.remote = any(isinstance(m, Teacher) and m.remote for m in self.members)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.members)
        self.raw_student = None if raw_student is None else raw_student.requires_grad_(False).eval().to(
            accelerator.device)
        self.route = dict(route or {})
        self.active = 0  # mot: the teacher of the current branch (set by kdexp.teachers.merge)

    def total_seconds(self) -> float:
        return self.seconds + sum(m.seconds for m in self.members if isinstance(m, Teacher))

    def teacher_of(self, example) -> int:
        """The index of ``example``'s teacher (``route``): its record's ``key`` field, mapped."""
        key, mapping = self.route["key"], self.route.get("map") or {}
        value = str(example.record.get(key))
        name = mapping.get(value) or (value if value in self.names else self.route.get("default") or value)
        if name not in self.names:
            raise UserError(f"a training example's {key}={value!r} names no teacher of teachers.names "
                            f"({', '.join(self.names)}); map it with teachers.route_map")
        return self.names.index(name)

    def used(self) -> list[int]:
        """The members the next micro-batch's target reads (``route``: each on its own rows)."""
        if self.rule == "mot":
            return [self.active]
        if self.rule == "mixture":  # a teacher of weight 0 is not run
            return [i for i, w in enumerate(self.weights) if w > 0]
        return list(range(len(self.members)))

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        """``teacher_index`` (``route``), and each served member's scores of its examples, under
        ``member{i}/`` (asked here, when the micro-batch is drawn, as a served teacher's are)."""
        out: dict[str, torch.Tensor] = {}
        index = [self.teacher_of(e) for e in examples] if self.rule == "route" else None
        if index is not None:
            out["teacher_index"] = torch.tensor(index, dtype=torch.long)
        for i in self.used():
            member = self.members[i]
            own = examples if index is None else [e for e, j in zip(examples, index, strict=True) if j == i]
            if isinstance(member, Teacher) and own:
                out.update({f"member{i}/{k}": v for k, v in member.inputs(own).items()})
        return out

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        with torch.no_grad(), self.accelerator.autocast() if autocast else nullcontext():
            if self.rule == "route":
                return self._routed(batch)
            logps = [self._logp(i, batch) for i in self.used()]
            if self.rule == "mot":  # the current branch's teacher alone
                return logps[0]
            if self.rule == "mixture":
                return combine.mixture(logps, [self.weights[i] for i in self.used()])
            raw_student = logits_of(self.raw_student, batch, self.vocab).float().log_softmax(-1)
            return combine.relative(*logps, raw_student, self.alpha)

    def _logp(self, i: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        member = self.members[i]
        if isinstance(member, Teacher):  # served or cached: its top-k and tail, densified
            own = {k.split("/", 1)[1]: v for k, v in batch.items() if k.startswith(f"member{i}/")}
            return member.distributions({**batch, **own}).float().log_softmax(-1)
        return logits_of(member, batch, self.vocab).float().log_softmax(-1)

    def _routed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each teacher run on its own sequences only (:func:`combine.route`'s target)."""
        index = batch["teacher_index"].to(batch["input_ids"].device)
        out = None
        for i in range(len(self.members)):
            rows = (index == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "targets") if k in batch}
            part = self._logp(i, {**sub, **{k: v for k, v in batch.items() if k.startswith(f"member{i}/")}})
            if out is None:
                out = part.new_zeros((index.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


def check_names(names: Any, rule: str, choices: Sequence[str]) -> list[str]:
    """One line per problem of ``teachers.names`` for ``rule``: each a ``teacher=`` preset with
    a model, a model directory, a teacher server's address (``http://HOST:PORT``), or the top-k
    cache of a preset or directory (``cache:NAME``)."""
    from pathlib import Path

    from kdexp.config import is_cached, is_url
    from kdexp.errors import unknown_choice

    if isinstance(names, str) or not isinstance(names, Sequence):
        return [f"teachers.names must be a list of teacher= presets or model directories, got {names!r} "
                f"(e.g. teachers.names=[tiny,runs/other/final])"]
    problems = []
    if not names:
        problems.append(f"teachers.rule={rule} needs teachers.names, a list of teacher= presets or model "
                        f"directories (e.g. teachers.names=[tiny,runs/other/final])")
    for name in map(str, names):
        if name == "none":
            problems.append("teachers.names entry 'none' is no model")
            continue
        model = name.removeprefix("cache:")  # a cache names its teacher as a live entry would
        if not is_url(name) and model not in choices and not Path(model).is_dir():
            label = "teachers.names entry" + (" cache:" if is_cached(name) else "")
            problems.append(str(unknown_choice(label, model, choices)))
    if rule == "relative" and len(names) != 2:
        problems.append(f"teachers.rule=relative takes two teachers, [fine-tuned, raw], got {len(names)}")
    if rule == "mot" and len(names) < 2:
        problems.append(f"teachers.rule=mot merges branches of two or more teachers, got {len(names)}")
    return problems


__all__ = ["RULES", "MultiTeacher", "check_names"]
