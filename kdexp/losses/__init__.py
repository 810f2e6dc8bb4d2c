"""The divergence library: ``divergence(name, **params)`` and ``names()``.

    from kdexp import losses
    fkl = losses.divergence("fkl", temperature=2.0)
    per_position = fkl(student_logits, teacher_logits)   # [B, T, V] x [B, T, V] -> [B, T] float32
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch

from kdexp.errors import UserError, did_you_mean
from kdexp.losses.divergences import DIVERGENCES

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def names() -> list[str]:
    """Names of every registered divergence (the choices of ``loss=``)."""
    return DIVERGENCES.names()


def parameters(name: str) -> dict[str, object]:
    """The hyper-parameters of a divergence and their defaults, e.g. ``{"temperature": 1.0}``."""
    sig = inspect.signature(DIVERGENCES.get(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}


def divergence(name: str, **params: object) -> Divergence:
    """The divergence ``name`` with its hyper-parameters bound.

    Returns a callable ``(student_logits, teacher_logits) -> per-position float32 tensor`` of
    shape ``logits.shape[:-1]``, summed over the vocabulary. Unknown names and parameters are
    a :class:`UserError` with the closest valid spelling.
    """
    fn = DIVERGENCES.get(name)
    allowed = parameters(name)
    for key in params:
        if key not in allowed:
            raise UserError(f"loss '{name}' has no parameter '{key}';{did_you_mean(key, allowed)} "
                            f"parameters: {', '.join(allowed) or 'none'}")
    temperature = params.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"loss '{name}': temperature must be > 0, got {temperature}")
    return functools.partial(fn, **params)


__all__ = ["Divergence", "divergence", "names", "parameters"]
