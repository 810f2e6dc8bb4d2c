"""The fused path: losses computed from the models' final hidden states and LM heads, a chunk
of target positions at a time, so that no ``[N, V]`` logits tensor of either model is alive.

    student = Head(hidden, lm_head.weight, lm_head.bias)       # hidden [B, T, H]
    teacher = Head(t_hidden, t_head.weight)                     # or Dense(logits), Sparse(...)
    loss = fused_loss(fn, index, student, teacher, chunk)       # fn(s_logits [n, V], t_logits, rows) -> scalar

For each chunk of ``chunk`` positions it builds both chunks of logits (``hidden @ W.T + b``
under the autocast state of the call, exactly as the model's head would), evaluates ``fn`` and
its gradient with respect to every input that needs one, and moves on: the working set is
O(chunk x V), the gradients O(N x H) for the hidden states and O(V x H) for the head. The
gradients are computed in the forward pass (the loss is a scalar, so the backward pass only
scales them by its incoming gradient), as Liger-Kernel's fused linear losses do (Hsu et al.,
"Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv 2410.10989, 2024, Sec. 3.3):
each chunk's head matmul runs once forward and twice backward, with no recompute.

The values and gradients are those of the plain path (``fn`` on the full logits) up to the
order of floating-point sums; ``tests/unit/test_fused.py`` checks every divergence and CE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUTO_CHUNK_ELEMENTS = 256 * 152064  # positions x V per chunk: 149 MiB of float32, as loss.chunk_size=auto

ChunkLoss = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


@dataclass
class Rows:
    """The logits of N positions, built a chunk at a time: ``build(*[t[sel] for t in
    per_row], *shared) -> [n, V]``. Gradients reach the tensors of ``per_row`` and ``shared``
    that require them."""

    per_row: tuple[torch.Tensor, ...]
    shared: tuple[torch.Tensor | None, ...]
    build: Callable[..., torch.Tensor]
    width: int  # V, the logits' width

    @property
    def n(self) -> int:
        return self.per_row[0].shape[0]

    def each(self, chunk: int):
        """``(positions, logits [n, V])`` for every chunk, without gradients."""
        with torch.no_grad():
            for start in range(0, self.n, chunk):
                sel = torch.arange(start, min(start + chunk, self.n), device=self.per_row[0].device)
                yield sel, self.build(*[t[start:start + chunk] for t in self.per_row], *self.shared)


def _linear(vocab: int | None):
    def build(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if vocab is not None:
            w, b = w[:vocab], None if b is None else b[:vocab]
        return F.linear(h, w, b)
    return build


def identity(x: torch.Tensor) -> torch.Tensor:
    """Logits that are already logits (:class:`Dense`); an LM head bypassed (``bare_heads``)."""
    return x


@dataclass
class Head:
    """A model's logits as its final hidden states ``[B, T, H]`` and its LM head (``weight``
    ``[V, H]``, ``bias`` ``[V]`` or None), cut to the first ``vocab`` rows when set."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    vocab: int | None = None

    def select(self, index: torch.Tensor) -> Rows:
        rows = self.hidden.reshape(-1, self.hidden.shape[-1]).index_select(0, index)
        # The vocabulary cut once, not per chunk: autocast then casts one tensor once, and the
        # chunks' gradients are [vocab, H], not the whole head's.
        w, b = self.weight, self.bias
        if self.vocab is not None:
            w, b = w[: self.vocab], None if b is None else b[: self.vocab]
        return Rows((rows,), (w, b), _linear(None), self.vocab or self.weight.shape[0])

    def logits(self) -> torch.Tensor:
        """The plain path's logits ``[B, T, V]`` (for references and fallbacks)."""
        return _linear(self.vocab)(self.hidden, self.weight, self.bias)


@dataclass
class Dense:
    """Logits ``[B, T, V]`` already computed (a model without an exposed head)."""

    values: torch.Tensor

    def select(self, index: torch.Tensor) -> Rows:
        width = self.values.shape[-1]
        return Rows((self.values.reshape(-1, width).index_select(0, index),), (), identity, width)

    def logits(self) -> torch.Tensor:
        return self.values


@dataclass
class Sparse:
    """A teacher given at the valid positions only (in the order of ``index``): a cache's
    top-k ids and logits and the logit every other entry takes (``fill``), densified a chunk
    at a time. Never has a gradient."""

    ids: torch.Tensor      # [N, k] int64
    values: torch.Tensor   # [N, k] float32
    fill: torch.Tensor     # [N] float32
    width: int
    mask: torch.Tensor     # [B, T]: the positions it covers

    def select(self, index: torch.Tensor) -> Rows:
        covered = self.mask.reshape(-1).nonzero().squeeze(1)
        if not torch.equal(covered.to(index.device), index):
            raise RuntimeError("a sparse teacher covers other positions than the loss asks for")
        return Rows((self.ids, self.values, self.fill), (), self._build, self.width)

    def _build(self, ids: torch.Tensor, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        dense = fill[:, None].expand(-1, max(self.width, int(ids.max()) + 1 if ids.numel() else 0)).clone()
        dense.scatter_(1, ids, values)
        return dense[:, :self.width]

    def logits(self) -> torch.Tensor:
        out = torch.zeros((*self.mask.shape, self.width), dtype=torch.float32, device=self.mask.device)
        out[self.mask] = self._build(self.ids, self.values, self.fill)
        return out


Logits = Head | Dense | Sparse


def chunk_rows(chunk_size: int | str | None, vocab: int, n: int) -> int:
    """Positions per chunk: ``chunk_size``, or (``auto``, or null, which for the other paths
    means "no chunks") ``AUTO_CHUNK_ELEMENTS // V``."""
    if chunk_size in (None, "auto"):
        return max(1, min(n, AUTO_CHUNK_ELEMENTS // max(vocab, 1)))
    return max(1, int(chunk_size))


def fused_loss(fn: ChunkLoss, student: Rows, teacher: Rows | None, chunk: int,
               grad_scale: float = 1.0) -> torch.Tensor:
    """``sum over chunks of fn(student_logits, teacher_logits, positions)``, a scalar whose
    gradient reaches every input of ``student`` and ``teacher`` that requires one. ``fn``
    gets each chunk's logits ``[n, V]`` and the chunk's positions (indices into the N rows).
    Without grad mode (an evaluation), no gradient is computed.

    ``grad_scale``: the loss scale of fp16 training (the GradScaler's current scale). The
    chunks' gradients are computed at that scale and divided by it in float32, as the plain
    path's are computed from the scaled loss, so that float16 gradients do not underflow."""
    tensors = [*student.per_row, *student.shared]
    layout = [len(student.per_row), len(student.shared)]
    if teacher is not None:
        tensors += [*teacher.per_row, *teacher.shared]
        layout += [len(teacher.per_row), len(teacher.shared)]
    builds = (student.build, None if teacher is None else teacher.build)
    return _Fused.apply(fn, builds, layout, chunk, (torch.is_grad_enabled(), float(grad_scale)), *tensors)


def _accumulator(t: torch.Tensor) -> torch.dtype:
    """The dtype gradients of ``t`` are summed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


class _Fused(torch.autograd.Function):
    """Chunk by chunk, forward and gradients at once; backward scales them by grad_out.

    The gradients are summed in float32 (float64 for float64 inputs) and kept so; the backward
    pass multiplies them by ``grad_out`` before casting to each input's dtype, so that a loss
    scale (fp16's GradScaler) neither overflows nor underflows in a low-precision cast, and the
    loss can be differentiated more than once. Each shared tensor (a head's weight and bias)
    is detached once, so that autocast casts it once for every chunk (its cache is keyed by
    the tensor), not once per chunk.
    """

    @staticmethod
    def forward(ctx, fn, builds, layout, chunk, grad, *tensors):  # noqa: D102 (autograd protocol)
        build_s, build_t = builds
        grad_mode, scale = grad
        offset = 5  # fn, builds, layout, chunk, grad
        need = [grad_mode and t is not None and ctx.needs_input_grad[offset + i] for i, t in enumerate(tensors)]
        groups = _split(list(range(len(tensors))), layout)
        per_row = {i for g in groups[::2] for i in g}
        grads: list[torch.Tensor | None] = [
            torch.zeros(t.shape, dtype=_accumulator(t), device=t.device) if n else None
            for t, n in zip(tensors, need, strict=True)]
        shared = {i: None if tensors[i] is None else _once(tensors[i].detach().requires_grad_(need[i]))
                  for g in groups[1::2] for i in g}
        n = tensors[0].shape[0]
        device = tensors[0].device
        total = torch.zeros((), dtype=torch.float32, device=device)
        wanted = [i for i in range(len(tensors)) if need[i]]
        for start in range(0, n, chunk):
            sel = torch.arange(start, min(start + chunk, n), device=device)
            with torch.enable_grad():
                pieces = dict(shared)
                for i in per_row:
                    pieces[i] = tensors[i][start:start + chunk].detach().requires_grad_(need[i])
                s = build_s(*[pieces[i] for i in groups[0] + groups[1]])
                t = None if build_t is None else build_t(*[pieces[i] for i in groups[2] + groups[3]])
                value = fn(s, t, sel)
                if wanted and value.requires_grad:
                    got = torch.autograd.grad(value, [pieces[i] for i in wanted], value.new_tensor(scale),
                                              allow_unused=True)
                    for i, g in zip(wanted, got, strict=True):
                        if g is None:
                            continue
                        if i in per_row:
                            grads[i][start:start + chunk] += g
                        else:
                            grads[i] += g
            total += value.detach().float()
        if scale != 1.0:
            for g in grads:
                if g is not None:
                    g.div_(scale)
        ctx.grads, ctx.dtypes = grads, [None if t is None else t.dtype for t in tensors]
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grads = [None if g is None else (g * grad_out.to(g.dtype)).to(dtype)
                 for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)]
        return None, None, None, None, None, *grads


def _once(t: torch.Tensor) -> torch.Tensor:
    """A shared tensor without a gradient (the frozen teacher's head) cast to the autocast dtype
    here, once: autocast caches its casts only for tensors that require a gradient, and would
    otherwise cast the whole ``[V, H]`` head again for every chunk. The same values either way."""
    kind = t.device.type
    if t.requires_grad or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else t


def _split(xs: Sequence, layout: list[int]) -> list[list]:
    out, i = [], 0
    for n in layout:
        out.append(list(xs[i:i + n]))
        i += n
    return out


__all__ = ["AUTO_CHUNK_ELEMENTS", "Dense", "Head", "Logits", "Rows", "Sparse", "chunk_rows", "fused_loss", "identity"]
