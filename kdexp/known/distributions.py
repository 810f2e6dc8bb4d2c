"""Distribution-level fits with a known answer, on the library's own divergences.

    from kdexp.known import distributions as kd
    fit = kd.fit_gaussian("fkl")          # a Gaussian fitted to a two-mode mixture on a grid
    fit.mean, fit.std, kd.mixture_moments()   # forward KL: the mixture's moments exactly

Three settings where the field's claims about divergences can be checked against the truth:

* :func:`fit_gaussian`: one Gaussian fitted to a mixture of two, on a fine grid (a discretized
  Gaussian is an exponential family on the grid, with statistics x and x^2). The forward-KL
  optimum is moment matching, exactly: the fit's grid mean and variance equal the mixture's.
  Reverse KL is mode-seeking: started near one mode it settles on it (Minka, "Divergence
  measures and message passing", MSR-TR-2005-173, 2005; Gu et al., MiniLLM, ICLR 2024, Fig. 2).
* :func:`fit_discrete`: a student distribution over V tokens fitted to a teacher, free (it can
  represent the teacher: every divergence's minimum is the teacher itself) or capacity-limited
  (rank-r logits), with the error on the teacher's head and tail tracked over the steps (Wu et
  al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
  Models", COLING 2025: forward KL fits the head first, reverse KL the tail first).

Everything is float64 on CPU, deterministic, and takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kdexp import losses

GRID = torch.linspace(-12.0, 12.0, 961, dtype=torch.float64)


def mixture_log_probs(means: tuple[float, ...] = (-3.0, 3.0), stds: tuple[float, ...] = (1.0, 1.0),
                      weights: tuple[float, ...] = (0.5, 0.5), grid: torch.Tensor = GRID) -> torch.Tensor:
    """Log-probabilities of a Gaussian mixture discretized on ``grid`` (normalized over it)."""
    parts = [math.log(w) - 0.5 * ((grid - m) / s) ** 2 - math.log(s) for m, s, w in zip(means, stds, weights,
                                                                                             strict=True)]
    return torch.log_softmax(torch.logsumexp(torch.stack(parts), 0), -1)


def moments(log_p: torch.Tensor, grid: torch.Tensor = GRID) -> tuple[float, float]:
    """Mean and standard deviation of a distribution on ``grid``."""
    p = log_p.exp()
    mean = float((p * grid).sum())
    return mean, math.sqrt(float((p * (grid - mean) ** 2).sum()))


def mixture_moments(**mixture) -> tuple[float, float]:
    """The forward-KL optimum of :func:`fit_gaussian`: the mixture's mean and std on the grid."""
    return moments(mixture_log_probs(**mixture))


def gaussian_logits(mean: torch.Tensor, log_std: torch.Tensor, grid: torch.Tensor = GRID) -> torch.Tensor:
    return -0.5 * ((grid - mean) / log_std.exp()) ** 2


@dataclass
class GaussianFit:
    divergence: str
    mean: float
    std: float
    loss: float
    trace: list[tuple[float, float]] = field(default_factory=list)  # (mean, std) every 50 steps


def fit_gaussian(divergence: str = "fkl", start: tuple[float, float] = (1.0, 0.5), steps: int = 3000,
                 lr: float = 0.05, **params) -> GaussianFit:
    """One Gaussian (mean, std) fitted to :func:`mixture_log_probs` by minimizing
    ``losses.divergence(divergence, **params)`` (teacher = the mixture) with Adam from ``start``
    (mean, std). Reverse KL has two optima here: a broad one over both modes (a local optimum,
    reached from a broad start such as (0.5, 3)) and one on a single mode, the global one, with
    KL = log 2 when the modes do not overlap."""
    target = mixture_log_probs().unsqueeze(0)
    mean = torch.tensor(start[0], dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(start[1]), dtype=torch.float64, requires_grad=True)
    div = losses.divergence(divergence, **params)
    opt = torch.optim.Adam([mean, log_std], lr=lr)
    trace = []
    for step in range(steps):
        opt.zero_grad()
        loss = div(gaussian_logits(mean, log_std).unsqueeze(0), target).sum()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            trace.append((float(mean.detach()), float(log_std.detach().exp())))
    with torch.no_grad():
        final = float(div(gaussian_logits(mean, log_std).unsqueeze(0), target).sum())
        fitted = torch.log_softmax(gaussian_logits(mean, log_std), -1)
    grid_mean, grid_std = moments(fitted)
    return GaussianFit(divergence, grid_mean, grid_std, final, trace)


def teacher_distribution(vocab: int = 64, seed: int = 0, zipf: float = 1.1) -> torch.Tensor:
    """A teacher over ``vocab`` tokens: Zipf-like probabilities (a long tail), tokens shuffled;
    log-probabilities, float64."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    logits = -zipf * ranks.log() + 0.3 * torch.randn(vocab, generator=g, dtype=torch.float64)
    return torch.log_softmax(logits[torch.randperm(vocab, generator=g)], -1)


def head_mask(log_p: torch.Tensor, mass: float = 0.5) -> torch.Tensor:
    """The teacher's head: its most probable tokens that together hold ``mass`` (at least one)."""
    order = log_p.argsort(descending=True)
    cumulative = log_p[order].exp().cumsum(0)
    count = int((cumulative < mass).sum()) + 1
    mask = torch.zeros_like(log_p, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


@dataclass
class DiscreteFit:
    divergence: str
    rank: int | None
    tv: float                                   # total variation to the teacher at the end
    head_error: list[float] = field(default_factory=list)   # sum |q - p| over the head, per logged step
    tail_error: list[float] = field(default_factory=list)   # the same over the tail
    steps: list[int] = field(default_factory=list)


def fit_discrete(divergence: str, teacher: torch.Tensor | None = None, rank: int | None = None,
                 steps: int = 2000, lr: float = 0.05, log_every: int = 20, seed: int = 1,
                 **params) -> DiscreteFit:
    """A student over the teacher's tokens fitted by ``divergence`` with Adam from uniform: free
    logits (``rank`` None: it can represent the teacher), or logits ``B c`` in a fixed random
    ``rank``-dimensional subspace (``B``: vocab x rank, only ``c`` learned), a student that cannot
    represent the teacher and must choose what to fit. Tracks the head and tail errors."""
    log_p = teacher_distribution() if teacher is None else teacher
    vocab = log_p.shape[-1]
    if rank is None:
        weights = torch.zeros(vocab, dtype=torch.float64, requires_grad=True)

        def logits() -> torch.Tensor:
            return weights
    else:
        g = torch.Generator().manual_seed(seed)
        basis = torch.randn(vocab, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
        weights = torch.zeros(rank, dtype=torch.float64, requires_grad=True)

        def logits() -> torch.Tensor:
            return basis @ weights
    params_ = [weights]
    div = losses.divergence(divergence, **params)
    opt = torch.optim.Adam(params_, lr=lr)
    head = head_mask(log_p)
    fit = DiscreteFit(divergence, rank, 0.0)
    p = log_p.exp()
    for step in range(steps + 1):
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                gap = (torch.softmax(logits(), -1) - p).abs()
            fit.steps.append(step)
            fit.head_error.append(float(gap[head].sum()))
            fit.tail_error.append(float(gap[~head].sum()))
        if step == steps:
            break
        opt.zero_grad()
        div(logits().unsqueeze(0), log_p.unsqueeze(0)).sum().backward()
        opt.step()
    fit.tv = 0.5 * (fit.head_error[-1] + fit.tail_error[-1])
    return fit
