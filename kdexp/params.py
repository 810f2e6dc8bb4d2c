"""Declared parameters: a name, the values it accepts, and one line of documentation.

Methods (:data:`kdexp.methods.METHODS`) and divergences (:data:`kdexp.losses.catalog.DECLARED`)
declare their parameters with :class:`Param`; the run's own settings (``train.*``, ``eval.*``,
...) are declared in :data:`kdexp.config.SETTINGS`. Every check of a config runs from these
declarations, in :func:`kdexp.checks.declared_problems`, without importing torch.

    Param("lmbda", unit, "in [0, 1]", "probability that a micro-batch is student-generated")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """``name``: the key; ``check``: whether a value is accepted; ``what``: the accepted values
    as the error message says them (``must be in [0, 1]``); ``doc``: what it does."""

    name: str
    check: Callable[[Any], bool]
    what: str
    doc: str = ""

    def problem(self, value: Any, key: str | None = None, context: str = "") -> str | None:
        """The one-line error for ``value`` (``None`` when it is accepted)."""
        if self.check(value):
            return None
        return f"{key or self.name} must be {self.what}, got {value!r}{context}"


def number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def between(lo: float, hi: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """A number in the interval from ``lo`` to ``hi`` (each end closed unless told open)."""
    return lambda v: number(v) and (v > lo if low_open else v >= lo) and (v < hi if high_open else v <= hi)


unit = between(0, 1)


def real(v: Any) -> bool:
    """An int or float (not a bool), infinity included."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def positive(v: Any) -> bool:
    """> 0, infinity included (``train.max_grad_norm=inf``: measure the norm, never clip)."""
    return real(v) and v > 0


def nonneg(v: Any) -> bool:
    return real(v) and v >= 0


def at_least(lo: float) -> Callable[[Any], bool]:
    """A number >= ``lo``, infinity included."""
    return lambda v: real(v) and v >= lo


def positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: v in choices


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``check``, or null."""
    return lambda v: v is None or check(v)


def anything(v: Any) -> bool:
    return True
