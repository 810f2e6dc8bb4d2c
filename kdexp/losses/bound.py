"""Divergences made concrete: ``divergence(name, **params)`` binds and checks the parameters
and chooses the plain or the chunked path. Imported through :mod:`kdexp.losses`:

    from kdexp import losses
    fkl = losses.divergence("fkl", temperature=2.0)
    per_position = fkl(student_logits, teacher_logits)   # [B, T, V] x [B, T, V] -> [B, T] float32
    per_position = fkl(student_logits, teacher_logits, mask)   # computed where mask [B, T] is true, 0 elsewhere
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from kdexp.errors import UserError
from kdexp.losses import catalog
from kdexp.losses.divergences import DIVERGENCES

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


GENERIC = {"temperature": 1.0, "chunk_size": None}  # accepted by every divergence (catalog.GENERIC)
AUTO_CHUNK_ELEMENTS = 256 * 152064  # chunk_size="auto": positions x V per chunk (149 MiB of float32)


def parameters(name: str) -> dict[str, object]:
    """The hyper-parameters of a divergence and their defaults, e.g. ``{"temperature": 1.0, ...}``.

    ``temperature`` and ``chunk_size`` (the chunked path, see :func:`divergence`) are accepted
    by every divergence.
    """
    sig = inspect.signature(DIVERGENCES.get(name))
    own = {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    return {**GENERIC, **own}


def divergence(name: str, **params: object) -> Divergence:
    """The divergence ``name`` with its hyper-parameters bound.

    Returns a callable ``(student_logits, teacher_logits) -> per-position float32 tensor`` of
    shape ``logits.shape[:-1]``, summed over the vocabulary. Unknown names and parameters, and
    values out of range, are a :class:`UserError` with the closest valid spelling.

    ``chunk_size=N`` computes it over N positions at a time, in the forward pass and again
    (recomputed) in the backward pass, so that the extra memory is O(N x V) instead of
    O(B x T x V): the values and gradients are those of the plain path. ``chunk_size="auto"``
    takes ``N = AUTO_CHUNK_ELEMENTS // V`` (256 positions at V = 152064, 1216 at 32000), so a
    working tensor stays near 149 MiB of float32 whatever the vocabulary. Inputs of no more
    than N positions take the plain path (one chunk is the plain path, without the recompute).
    """
    fn = DIVERGENCES.get(name)
    problems = catalog.problems(name, params)
    if problems:
        raise UserError(problems[0])
    params = dict(params)
    chunk_size = params.pop("chunk_size", None)
    return Bound(name, fn, params, chunk_size)


class Bound:
    """A divergence with its parameters bound; values are clamped at 0.

    Every divergence here is >= 0; in float32 a pair of nearly equal distributions can round
    to -1e-8, which the clamp removes (its gradient there is ~0 anyway). ``params`` may be
    changed in place by a schedule (TAID's ``t``); ``chunk_size`` selects the chunked path.
    """

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], params: dict[str, object],
                 chunk_size: int | None = None):
        self.name, self.fn, self.params, self.chunk_size = name, fn, params, chunk_size

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position values ``[...]``; with ``mask`` (bool, ``logits.shape[:-1]``) only the
        masked-in positions are computed (the others are 0): a batch's prompt and padding
        positions, whose values the loss drops, cost nothing."""
        rows = self.chunk_rows(student_logits.shape[-1])
        if mask is not None and bool(mask.all()):
            mask = None
        wanted = student_logits[..., 0].numel() if mask is None else int(mask.sum())
        if rows is not None and wanted > rows:
            return chunked(self._plain, rows, student_logits, teacher_logits, mask)
        if mask is None:
            return self._plain(student_logits, teacher_logits)
        if not wanted:
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        values = self._plain(student_logits[mask], teacher_logits[mask])
        return values.new_zeros(mask.shape).masked_scatter(mask, values)  # float32 (float64 stays float64)

    def chunk_rows(self, vocab: int) -> int | None:
        """Positions per chunk at this vocabulary size (None: the plain path)."""
        if self.chunk_size == "auto":
            return max(1, AUTO_CHUNK_ELEMENTS // vocab)
        return self.chunk_size

    def _plain(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.fn(student_logits, teacher_logits, **self.params).clamp_min(0.0)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"divergence({self.name!r}{', ' if args else ''}{args})"


def chunked(fn: Divergence, chunk_size: int, student_logits: torch.Tensor,
            teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``fn`` over ``chunk_size`` positions at a time, with O(chunk x V) extra memory; with
    ``mask``, over the masked-in positions only (0 elsewhere, and no gradient there)."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    return _Chunked.apply(fn, chunk_size, index, student_logits, teacher_logits)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V], a view for contiguous or vocabulary-sliced logits."""
    return x.reshape(-1, x.shape[-1])


def _chunks(n: int, chunk_size: int, index: torch.Tensor | None) -> list:
    """Row selectors of ``chunk_size`` rows: slices of all ``n`` rows, or pieces of ``index``."""
    if index is None:
        return [slice(i, i + chunk_size) for i in range(0, n, chunk_size)]
    return list(index.split(chunk_size))


class _Chunked(torch.autograd.Function):
    """Forward without a graph, chunk by chunk; backward recomputes each chunk's graph alone.

    The gradients are written into one preallocated tensor per input of the input's shape,
    handed to autograd as is (no view in between, so no copy is made when accumulating). With
    a row ``index``, only those rows are computed; the others are 0, and so are their gradients.
    """

    @staticmethod
    def forward(ctx, fn, chunk_size, index, student_logits, teacher_logits):  # noqa: D102 (autograd protocol)
        ctx.fn, ctx.chunk_size, ctx.index = fn, chunk_size, index
        ctx.save_for_backward(student_logits, teacher_logits)
        s, t = _rows(student_logits), _rows(teacher_logits)
        with torch.no_grad():
            if index is None:
                out = torch.cat([fn(s[rows], t[rows]) for rows in _chunks(s.shape[0], chunk_size, None)])
            else:
                out = torch.zeros(s.shape[0], dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)
                for rows in _chunks(s.shape[0], chunk_size, index):
                    out[rows] = fn(s[rows], t[rows])
        return out.view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        inputs = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        alloc = torch.empty if ctx.index is None else torch.zeros  # rows outside the index: 0
        grads = [alloc(x.shape, dtype=x.dtype, device=x.device) if n else None
                 for x, n in zip(inputs, need, strict=True)]
        rows_in = [_rows(x) for x in inputs]
        rows_out = [_rows(g) if g is not None else None for g in grads]
        grad_rows = grad_out.reshape(-1)
        for rows in _chunks(rows_in[0].shape[0], ctx.chunk_size, ctx.index):
            with torch.enable_grad():
                pieces = [x[rows].detach().requires_grad_(n) for x, n in zip(rows_in, need, strict=True)]
                value = ctx.fn(*pieces)
                wanted = [p for p, n in zip(pieces, need, strict=True) if n]
                got = iter(torch.autograd.grad(value, wanted, grad_rows[rows]))
            for g, n in zip(rows_out, need, strict=True):
                if n:
                    g[rows] = next(got)
        return None, None, None, *grads


__all__ = ["Bound", "Divergence", "chunked", "divergence", "parameters"]
