"""An objective is a weighted list of terms, reduced once by the global number of valid tokens.

    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5},
                                     {"loss": "fkl", "weight": 0.5, "temperature": 2.0}])
    loss, parts = objective(student_logits, teacher_logits, targets, num_tokens)

``num_tokens`` is the count of valid target positions over *every* micro-batch of the
optimizer step and every process, so that the sum of the micro-batch losses is exactly the
token mean of the full batch, whatever the accumulation and the padding (the fix for the
per-micro-batch-mean bias, e.g. TRL issue 4719).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdexp import losses
from kdexp.errors import UserError

IGNORE_INDEX = -100

TermFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of ``targets`` (0 where ignored), in float32.

    student_logits [B, T, V], targets [B, T] (already shifted: ``targets[:, t]`` is the token
    that follows position t, or ``IGNORE_INDEX``) -> [B, T].
    """
    flat = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                           targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(targets.shape)


@dataclass(frozen=True)
class Term:
    """One weighted term: ``fn(student_logits, teacher_logits, targets) -> [B, T]``."""

    name: str
    weight: float
    fn: TermFn
    needs_teacher: bool


def make_term(spec: Mapping[str, object]) -> Term:
    """A term from its config: ``{loss: ce | <divergence>, weight: w, t2_scale: bool, **params}``.

    ``t2_scale`` multiplies the weight by ``temperature ** 2``, the gradient-magnitude
    correction of Hinton et al. (2015, Sec. 2); off by default.
    """
    spec = dict(spec)
    name = str(spec.pop("loss"))
    weight = float(spec.pop("weight", 1.0))
    t2_scale = bool(spec.pop("t2_scale", False))
    if name == "ce":
        if spec:
            raise UserError(f"the ce term takes no parameters, got {sorted(spec)}")
        return Term("ce", weight, lambda s, t, y: cross_entropy(s, y), needs_teacher=False)
    div = losses.divergence(name, **spec)
    if t2_scale:
        weight *= float(spec.get("temperature", 1.0)) ** 2
    return Term(name, weight, lambda s, t, y: div(s, t), needs_teacher=True)


class Objective:
    """Sum of weighted terms, masked by ``targets != IGNORE_INDEX`` and divided by ``num_tokens``."""

    def __init__(self, terms: Sequence[Term]):
        if not terms:
            raise UserError("the objective has no terms with a non-zero weight")
        self.terms = list(terms)
        names = [t.name for t in self.terms]
        # Two terms of the same loss (say fkl at two temperatures) get distinct log keys.
        self.keys = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    @classmethod
    def from_spec(cls, spec: Sequence[Mapping[str, object]]) -> Objective:
        terms = [make_term(s) for s in spec]
        return cls([t for t in terms if t.weight != 0])

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 targets: torch.Tensor, num_tokens: torch.Tensor | float,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-term values) for one micro-batch.

        student_logits / teacher_logits [B, T, V], targets [B, T]. Each returned value is the
        micro-batch's share of the token mean over the whole step, so summing them over the
        micro-batches (and processes) gives the step's mean.
        """
        mask = targets != IGNORE_INDEX  # [B, T]
        total = student_logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for key, term in zip(self.keys, self.terms, strict=True):
            per_position = term.fn(student_logits, teacher_logits, targets)  # [B, T]
            value = torch.where(mask, per_position, 0.0).sum() / num_tokens
            parts[key] = value.detach()
            total = total + term.weight * value
        return total, parts
