"""Several teachers' distributions made into one target (``teachers.rule``), position by position.

Each function takes the teachers' log-probabilities at temperature 1 (``[..., V]``, any leading
shape) and returns the target's log-probabilities, normalized over the last dimension; the loss
then reads them as it reads one teacher's logits (tempered by ``loss.temperature``, through the
plain, chunked or fused path).

- :func:`mixture`: ``p*(y) = sum_i w_i p_i(y)``, a weighted average of the distributions (a
  convex combination, so every teacher's modes stay modes of the target);
- :func:`relative`: the relative-information target ``p*(y) ∝ p_ft(y) (q_raw(y) / p_raw(y))^alpha``
  (the fine-tuned teacher, corrected token by token by how the raw student differs from the raw
  teacher; alpha = 0 is the fine-tuned teacher alone);
- :func:`route`: each sequence's own teacher (multi-teacher on-policy distillation routes every
  example to one teacher: the target of sequence b is teacher ``index[b]``'s distribution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _normalized(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} teachers")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def mixture(logps: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``log sum_i w_i p_i``, the weights normalized to sum to 1 (a zero weight drops a teacher)."""
    w = _normalized(weights, len(logps))
    terms = [lp + torch.log(torch.tensor(wi, dtype=lp.dtype, device=lp.device)) for lp, wi in zip(logps, w, strict=True)
             if wi > 0]
    return torch.logsumexp(torch.stack(terms), dim=0)


def relative(finetuned: torch.Tensor, raw_teacher: torch.Tensor, raw_student: torch.Tensor,
             alpha: float) -> torch.Tensor:
    """``log_softmax(log p_ft + alpha (log q_raw - log p_raw))``."""
    floor = -1e4  # a token a model rules out (-inf) stays out, without -inf - -inf = NaN
    finetuned, raw_teacher, raw_student = (x.clamp_min(floor) for x in (finetuned, raw_teacher, raw_student))
    return torch.log_softmax(finetuned + alpha * (raw_student - raw_teacher), dim=-1)


def route(logps: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Sequence b's target is ``logps[index[b]][b]`` (``logps``: each ``[B, ...]``; ``index``: ``[B]``)."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(logps)):
        raise ValueError(f"a sequence is routed to teacher {int(index.max())}, but there are {len(logps)}")
    stacked = torch.stack(list(logps))  # [n, B, ...]
    pick = index.to(stacked.device).view(1, -1, *([1] * (stacked.dim() - 2))).expand(1, *stacked.shape[1:])
    return stacked.gather(0, pick).squeeze(0)


RULES = ("route", "mixture", "relative")

__all__ = ["RULES", "mixture", "relative", "route"]
