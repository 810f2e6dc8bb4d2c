"""The divergence library: ``divergence(name, **params)``, ``names()`` and ``parameters(name)``.

    from kdexp import losses
    fkl = losses.divergence("fkl", temperature=2.0)
    per_position = fkl(student_logits, teacher_logits)   # [B, T, V] x [B, T, V] -> [B, T] float32
    per_position = fkl(student_logits, teacher_logits, mask)   # computed where mask [B, T] is true, 0 elsewhere

The records (descriptions, declared parameters) are in :mod:`kdexp.losses.catalog`, which
imports no torch; ``names()`` reads them. The rest (:mod:`kdexp.losses.bound`) is imported on
first use, so that checking a config does not import torch.
"""

from __future__ import annotations

from typing import Any

from kdexp.losses.catalog import names

_LAZY = {"divergence", "parameters", "chunked", "Bound", "Divergence", "AUTO_CHUNK_ELEMENTS", "GENERIC"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from kdexp.losses import bound

        return getattr(bound, name)
    raise AttributeError(f"module 'kdexp.losses' has no attribute {name!r}")


__all__ = ["chunked", "divergence", "names", "parameters"]
