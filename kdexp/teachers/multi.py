"""Several teachers combined into one target (``teachers.rule``), each a frozen model in this process.

    kdexp train teachers.rule=mixture teachers.names=[tiny,runs/other/final] teachers.weights=[0.7,0.3]
    kdexp train teachers.rule=route teachers.names=[tiny,runs/other/final] teachers.route_key=family \\
        'teachers.route_map={fact: tiny, arith: runs/other/final}'
    kdexp train teachers.rule=relative teachers.names=[runs/finetuned/final,tiny] teachers.alpha=0.5

At every position the teachers' distributions (at temperature 1, on the tokenizer's tokens) are
combined by :mod:`kdexp.teachers.combine` (``mixture``: a weighted average; ``relative``: the
first teacher corrected by the ratio of the raw student, ``teachers.raw_student`` or the
student as loaded, to the raw teacher, the second; ``route``: each example's own teacher, named
by its record's ``teachers.route_key`` field, through ``teachers.route_map`` when the field's
values are not teacher names). The result is read by the loss as one teacher's logits, so every
divergence and every method that reads the teacher's distributions on the dataset's or the
student's sequences applies. The combined target is built whole (``[B, T, V]``) and given to the
fused path as dense logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from kdexp.errors import UserError
from kdexp.teachers import combine
from kdexp.teachers.base import Logits, Teacher, logits_of


class MultiTeacher(Teacher):
    """Frozen teacher models whose distributions a rule combines per position."""

    kind = "multi"

    def __init__(self, accelerator, vocab: int | None, names: Sequence[str], models: Sequence[torch.nn.Module],
                 rule: str, weights: Sequence[float] | None = None, alpha: float = 1.0,
                 raw_student: torch.nn.Module | None = None, route: Mapping[str, Any] | None = None):
        super().__init__(accelerator, vocab)
        if rule not in combine.RULES:
            raise UserError(f"teachers.rule must be one of {', '.join(combine.RULES)}, got {rule!r}")
        self.names, self.rule, self.alpha = list(names), rule, float(alpha)
        self.modules = [m.requires_grad_(False).eval().to(accelerator.device) for m in models]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.modules)
        self.raw_student = None if raw_student is None else raw_student.requires_grad_(False).eval().to(
            accelerator.device)
        self.route = dict(route or {})

    def teacher_of(self, example) -> int:
        """The index of ``example``'s teacher (``route``): its record's ``key`` field, mapped."""
        key, mapping = self.route["key"], self.route.get("map") or {}
        value = str(example.record.get(key))
        name = mapping.get(value, value)
        if name not in self.names:
            raise UserError(f"a training example's {key}={value!r} names no teacher of teachers.names "
                            f"({', '.join(self.names)}); map it with teachers.route_map")
        return self.names.index(name)

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        if self.rule != "route":
            return {}
        return {"teacher_index": torch.tensor([self.teacher_of(e) for e in examples], dtype=torch.long)}

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        with torch.no_grad(), self.accelerator.autocast() if autocast else nullcontext():
            if self.rule == "route":
                return self._routed(batch)
            if self.rule == "mixture":  # a teacher of weight 0 is not run
                used = [i for i, w in enumerate(self.weights) if w > 0]
                logps = [self._logp(self.modules[i], batch) for i in used]
                return combine.mixture(logps, [self.weights[i] for i in used])
            finetuned, raw_teacher = (self._logp(m, batch) for m in self.modules)
            return combine.relative(finetuned, raw_teacher, self._logp(self.raw_student, batch), self.alpha)

    def _logp(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits_of(model, batch, self.vocab).float().log_softmax(-1)

    def _routed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each teacher run on its own sequences only (:func:`combine.route`'s target)."""
        index = batch["teacher_index"].to(batch["input_ids"].device)
        out = None
        for i, model in enumerate(self.modules):
            rows = (index == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = self._logp(model, {k: batch[k][rows] for k in ("input_ids", "attention_mask")})
            if out is None:
                out = part.new_zeros((index.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


def check_names(names: Any, rule: str, choices: Sequence[str]) -> list[str]:
    """One line per problem of ``teachers.names`` for ``rule``: each a ``teacher=`` preset with
    a model, or a model directory."""
    from pathlib import Path

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
        elif name not in choices and not Path(name).is_dir():
            problems.append(str(unknown_choice("teachers.names entry", name, choices)))
    if rule == "relative" and len(names) != 2:
        problems.append(f"teachers.rule=relative takes two teachers, [fine-tuned, raw], got {len(names)}")
    return problems


__all__ = ["MultiTeacher", "check_names"]
