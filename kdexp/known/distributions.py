"""Distribution-level fits with a known answer, on the library's own divergences.

    from kdexp.known import distributions as kd
    fit = kd.fit_gaussian("fkl")          # a Gaussian fitted to a two-mode mixture on a grid
    fit.mean, fit.std, kd.mixture_moments()   # forward KL: the mixture's moments exactly

Settings where the field's claims about divergences can be checked against the truth:

* :func:`fit_gaussian`: one Gaussian fitted to a mixture of two, on a fine grid (a discretized
  Gaussian is an exponential family on the grid, with statistics x and x^2). The forward-KL
  optimum is moment matching, exactly: the fit's grid mean and variance equal the mixture's.
  Reverse KL is mode-seeking: started near one mode it settles on it (Minka, "Divergence
  measures and message passing", MSR-TR-2005-173, 2005; Gu et al., MiniLLM, ICLR 2024, Fig. 2).
* :func:`fit_discrete`: a student distribution over V tokens fitted to a teacher, free (it can
  represent the teacher: every divergence's minimum is the teacher itself) or capacity-limited
  (``tied_tail``: free on the teacher's head, one shared logit for its tail; ``rank``: rank-r
  logits), with the error on the teacher's head and tail tracked over the steps.
* :func:`tied_tail_optimum`: the tied-tail student's optimum under Amari's alpha-divergence in
  closed form (forward KL at alpha = 1, reverse KL at 0), which the fits must reach.
* :func:`head_tail_race`: which part of the teacher a free student fits first under fkl and rkl
  (Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
  Language Models", COLING 2025: forward KL the head, reverse KL the tail), measured.
* :func:`mass_and_gradients` (drawn by :func:`plot_divergence_family`): every divergence's
  gradient at a fixed imperfect student, and the tail mass and entropy of its tied-tail optimum,
  as alpha and beta vary (ABKD, Wang et al., ICML 2025).

Everything is float64 on CPU, deterministic, and takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kdexp import losses
from kdexp.registry import Registry

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


def _free_basis(log_p: torch.Tensor, head: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    return torch.eye(log_p.shape[-1], dtype=torch.float64)


def _tied_tail_basis(log_p: torch.Tensor, head: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    slot = torch.full(head.shape, int(head.sum()), dtype=torch.long)   # the tail's shared slot is the last
    slot[head] = torch.arange(int(head.sum()))
    return torch.nn.functional.one_hot(slot, int(head.sum()) + 1).to(torch.float64)


def _rank_basis(log_p: torch.Tensor, head: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(log_p.shape[-1], rank, generator=g, dtype=torch.float64) / math.sqrt(rank)


STUDENTS = Registry("student family")
STUDENTS.add("free", _free_basis, description="one logit per token: it can represent the teacher")
STUDENTS.add("tied_tail", _tied_tail_basis,
             description="one logit per head token and one shared by the whole tail (uniform within it)")
STUDENTS.add("rank", _rank_basis, description="logits in a fixed random rank-r subspace")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def student_basis(student: str, log_p: torch.Tensor, mass: float = 0.5, rank: int = 4,
                  seed: int = 1) -> torch.Tensor:
    """The student family as a linear map: its logits are ``basis @ weights``. [V] -> [V, d]

    ``free``: the identity; ``tied_tail``: the indicator of each head token
    (``head_mask(log_p, mass)``) and of the tail; ``rank``: a fixed random [V, rank] matrix.
    """
    return STUDENTS.get(student)(log_p, head_mask(log_p, mass), rank, seed)


def entropy(log_q: torch.Tensor) -> float:
    return float(-(log_q.exp() * log_q).sum())


@dataclass
class DiscreteFit:
    divergence: str
    student: str
    tv: float                                   # total variation to the teacher at the end
    log_q: torch.Tensor                         # [V] the student's log-probabilities at the end
    tail_mass: float                            # the student's mass on the teacher's tail at the end
    entropy: float                              # the student's entropy at the end (nats)
    head_error: list[float] = field(default_factory=list)   # sum |q - p| over the head, per logged step
    tail_error: list[float] = field(default_factory=list)   # the same over the tail
    steps: list[int] = field(default_factory=list)


def fit_discrete(divergence: str, teacher: torch.Tensor | None = None, student: str = "free",
                 steps: int = 2000, lr: float = 0.05, log_every: int = 20, mass: float = 0.5,
                 rank: int = 4, seed: int = 1, optimizer: str = "adam", start: torch.Tensor | None = None,
                 **params) -> DiscreteFit:
    """A student over the teacher's tokens fitted by ``divergence`` (with ``params``) from
    ``start`` (log-probabilities [V], projected on the family; default uniform), the lr
    decayed to 0 by a cosine over the steps.

    ``student`` (:func:`student_basis`): ``free`` can represent the teacher; ``tied_tail`` and
    ``rank`` cannot and must choose what to fit. The head is ``head_mask(teacher, mass)``; the
    errors on the head and the tail are logged every ``log_every`` steps.
    """
    log_p = teacher_distribution() if teacher is None else teacher
    basis = student_basis(student, log_p, mass, rank, seed)                  # [V, d]
    if start is None:
        weights = torch.zeros(basis.shape[1], dtype=torch.float64)
    else:
        # least squares by the normal equations: lstsq's result varies in the last bit from call to call
        weights = torch.linalg.solve(basis.T @ basis, basis.T @ start.to(torch.float64))
    weights.requires_grad_(True)
    div = losses.divergence(divergence, **params)
    opt = OPTIMIZERS[optimizer]([weights], lr=lr)
    # Adam at a constant lr does not settle: once the gradients are at round-off level its
    # normalized steps grow again and the fit leaves the optimum in bursts.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    head = head_mask(log_p, mass)
    p = log_p.exp()
    head_error, tail_error, logged = [], [], []
    for step in range(steps + 1):
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                gap = (torch.softmax(basis @ weights, -1) - p).abs()
            head_error.append(float(gap[head].sum()))
            tail_error.append(float(gap[~head].sum()))
            logged.append(step)
        if step == steps:
            break
        opt.zero_grad()
        div((basis @ weights).unsqueeze(0), log_p.unsqueeze(0)).sum().backward()
        opt.step()
        schedule.step()
    log_q = torch.log_softmax(basis @ weights.detach(), -1)
    return DiscreteFit(divergence, student, 0.5 * (head_error[-1] + tail_error[-1]), log_q,
                       float(log_q[~head].exp().sum()), entropy(log_q), head_error, tail_error, logged)


def tied_tail_optimum(alpha: float, teacher: torch.Tensor | None = None, mass: float = 0.5) -> torch.Tensor:
    """The tied-tail student minimizing Amari's alpha-divergence (``alpha``: 1 fkl, 0 rkl), in
    closed form: log-probabilities [V].

    On the family the tail enters only through ``M``, the power mean of order ``alpha`` of the
    teacher's n tail probabilities (``sum_tail p^a q^(1-a) = n M^a q_t^(1-a)``, q_t the student's
    probability of each tail token),
    so the divergence is that to the positive measure ``r`` = (p on the head, M on each tail
    token), minimized over normalized q at ``q ∝ r`` (Hölder's inequality for 0 < alpha < 1,
    convexity outside; Amari, "Differential-Geometrical Methods in Statistics", 1985; Minka,
    MSR-TR-2005-173, 2005). Forward KL (M the arithmetic mean): q = p on the head, the
    teacher's tail mass spread evenly (moment matching on the family's indicator statistics).
    Reverse KL (M the geometric mean): the tail gets ``n M / (P_head + n M)``, which is at most
    the teacher's tail mass (AM-GM). Power means increase with their order (Hardy, Littlewood &
    Pólya, "Inequalities", 1934, Ch. II), so the tail mass increases with alpha.
    """
    log_p = teacher_distribution() if teacher is None else teacher
    head = head_mask(log_p, mass)
    tail = log_p[~head]
    if alpha == 0:
        log_m = tail.mean()
    else:
        log_m = (torch.logsumexp(alpha * tail, 0) - math.log(tail.numel())) / alpha
    return torch.log_softmax(torch.where(head, log_p, log_m), -1)


@dataclass
class Race:
    step: int
    lr: float
    optimizer: str
    head: dict[str, float]   # head_error[step] / head_error[0], per divergence
    tail: dict[str, float]   # tail_error[step] / tail_error[0]
    tv: dict[str, float]     # total variation to the teacher after all the steps

    def fkl_head_and_rkl_tail_ahead(self) -> bool:
        """The claim read across divergences: fkl's head error has fallen relatively further
        than rkl's, and rkl's tail error further than fkl's."""
        return self.head["fkl"] < self.head["rkl"] and self.tail["rkl"] < self.tail["fkl"]

    def each_fits_its_part_first(self) -> bool:
        """The claim read within each divergence: fkl's head error has fallen relatively
        further than its tail error, and rkl's tail error further than its head error."""
        return self.head["fkl"] < self.tail["fkl"] and self.tail["rkl"] < self.head["rkl"]


def head_tail_race(step: int = 20, lr: float = 0.05, optimizer: str = "adam", steps: int = 2000,
                   teacher: torch.Tensor | None = None, mass: float = 0.5) -> Race:
    """How far a free student from uniform has reduced its errors on the head and on the tail
    at ``step``, relative to the start, for each divergence (measured, not assumed).

    Wu, Tao, Wang, Zhao & Wong, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models", COLING 2025: forward KL fits the head first,
    reverse KL the tail first. ``steps`` must be a multiple of ``step``; the fits run to
    ``steps`` so that ``tv`` shows both converge.
    """
    fits = {d: fit_discrete(d, teacher, steps=steps, lr=lr, log_every=step, mass=mass, optimizer=optimizer)
            for d in ("fkl", "rkl")}
    return Race(step, lr, optimizer,
                {d: f.head_error[1] / f.head_error[0] for d, f in fits.items()},
                {d: f.tail_error[1] / f.tail_error[0] for d, f in fits.items()},
                {d: f.tv for d, f in fits.items()})


def imperfect_student(teacher: torch.Tensor | None = None, smoothing: float = 0.3, noise: float = 0.0,
                      seed: int = 2) -> torch.Tensor:
    """A fixed student near the teacher: ``(1 - smoothing) softmax(log p + noise * N(0, 1)) +
    smoothing / V``, log-probabilities [V]. Without noise it is p smoothed: too little mass on
    the head and too much on the far tail, in the teacher's rank order."""
    log_p = teacher_distribution() if teacher is None else teacher
    g = torch.Generator().manual_seed(seed)
    noisy = torch.softmax(log_p + noise * torch.randn(log_p.shape, generator=g, dtype=torch.float64), -1)
    return ((1 - smoothing) * noisy + smoothing / log_p.shape[-1]).log()


@dataclass
class FamilyPoint:
    name: str
    params: dict
    gradient: torch.Tensor          # [V] d loss / d student logits at the fixed student, vocabulary order
    head_share: float               # the share of the gradient's L1 norm on the teacher's head
    tail_mass: float                # the fitted tied-tail student's mass on the teacher's tail
    entropy: float                  # its entropy (nats)
    exact_tail_mass: float | None   # the closed form's where there is one (:func:`amari_alpha`), else None

    @property
    def label(self) -> str:
        return self.name + "".join(f" {k}={v:g}" for k, v in self.params.items())


def amari_alpha(name: str, params: dict) -> float | None:
    """The alpha of the Amari alpha-divergence that divergence ``name`` at ``params`` is, if it
    is one: fkl 1, rkl 0, ab with alpha + beta = 1 (Cichocki, Cruces & Amari, Entropy 2011)."""
    params = {**losses.parameters(name), **params}
    if name == "alpha" or (name == "ab" and math.isclose(params["alpha"] + params["beta"], 1.0)):
        return float(params["alpha"])
    return {"fkl": 1.0, "rkl": 0.0}.get(name)


def mass_and_gradients(teacher: torch.Tensor | None = None, student: torch.Tensor | None = None,
                       alphas: tuple[float, ...] = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5),
                       ab_grid: tuple[tuple[float, float], ...] = tuple(
                           (a, b) for a in (0.0, 0.5, 1.0, 1.5) for b in (-0.5, 0.0, 0.5, 1.0, 1.5)),
                       steps: int = 500, lr: float = 0.05, mass: float = 0.5) -> list[FamilyPoint]:
    """Every divergence of the library at its defaults, then ``alpha`` at ``alphas`` and ``ab`` at
    ``ab_grid`` (alpha, beta): the gradient of the loss w.r.t. the logits of a fixed imperfect
    ``student`` (log-probabilities [V], default :func:`imperfect_student`), and the tail mass
    and entropy of the tied-tail student fitted by Adam from the forward-KL optimum.

    The gradient's weights on the tokens are what ABKD (Wang et al., "ABKD: Pursuing a Proper
    Allocation of the Probability Mass in Knowledge Distillation via alpha-beta-Divergence",
    ICML 2025) reads as hardness (alpha) and confidence (beta) concentration. On the tied-tail
    family ab's tail, like alpha's, enters only through the order-alpha power mean of the
    teacher's tail (:func:`tied_tail_optimum`), so at alpha = 1 the optimum is forward KL's for
    every beta.
    """
    log_p = teacher_distribution() if teacher is None else teacher
    log_q = imperfect_student(log_p) if student is None else student
    tail = ~head_mask(log_p, mass)
    start = tied_tail_optimum(1.0, log_p, mass)
    settings = [(name, {}) for name in losses.names()]
    settings += [("alpha", {"alpha": a}) for a in alphas] + [("ab", {"alpha": a, "beta": b}) for a, b in ab_grid]
    points = []
    for name, params in settings:
        logits = log_q.clone().requires_grad_(True)
        losses.divergence(name, **params)(logits.unsqueeze(0), log_p.unsqueeze(0)).sum().backward()
        fit = fit_discrete(name, log_p, "tied_tail", steps=steps, lr=lr, log_every=steps, mass=mass,
                           start=start, **params)
        alpha = amari_alpha(name, params)
        exact = None if alpha is None else float(tied_tail_optimum(alpha, log_p, mass)[tail].exp().sum())
        grad = logits.grad.detach()
        points.append(FamilyPoint(name, params, grad, float(grad[~tail].abs().sum() / grad.abs().sum()),
                                  fit.tail_mass, fit.entropy, exact))
    return points


def plot_divergence_family(path, points: list[FamilyPoint] | None = None,
                           teacher: torch.Tensor | None = None) -> None:
    """One PNG of :func:`mass_and_gradients` (computed if ``points`` is None): the push on each
    logit by teacher rank (each divergence at its defaults, scaled to unit L1 norm); the fitted
    tied-tail student's tail mass against alpha (alpha; ab at each beta); its entropy against
    beta (ab at each alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_p = teacher_distribution() if teacher is None else teacher
    points = mass_and_gradients(log_p) if points is None else points
    order = log_p.argsort(descending=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, point in enumerate(p for p in points if not p.params):
        push = -point.gradient[order]
        axes[0].plot(range(1, len(push) + 1), push / push.abs().sum(), label=point.name, lw=1.2,
                     color=plt.cm.tab20(i), ls="-" if i % 2 == 0 else "--")
    axes[0].set_xscale("log")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].set(xlabel="teacher rank", ylabel="-d loss / d logit (unit L1)", title="push on each logit")
    axes[0].legend(fontsize=7, ncol=2)
    amari = sorted((p.params["alpha"], p.tail_mass, p.exact_tail_mass) for p in points
                   if p.name == "alpha" and p.params)
    if amari:
        a, fitted, exact = zip(*amari, strict=True)
        axes[1].plot(a, exact, "k-", lw=2, label="alpha: closed form")
        axes[1].plot(a, fitted, "ko", label="alpha: Adam")
    ab = [p for p in points if p.name == "ab" and p.params]
    for i, b in enumerate(sorted({p.params["beta"] for p in ab})):
        a, tails = zip(*sorted((p.params["alpha"], p.tail_mass) for p in ab if p.params["beta"] == b), strict=True)
        axes[1].plot(a, tails, "x--", color=f"C{i}", label=f"ab beta={b:g}")
    for i, a in enumerate(sorted({p.params["alpha"] for p in ab})):
        b, entropies = zip(*sorted((p.params["beta"], p.entropy) for p in ab if p.params["alpha"] == a), strict=True)
        axes[2].plot(b, entropies, "o-", color=f"C{i}", label=f"ab alpha={a:g}")
    axes[1].set(xlabel="alpha", ylabel="tail mass", title="tied-tail student at the optimum: tail mass")
    axes[2].set(xlabel="beta", ylabel="entropy (nats)", title="tied-tail student at the optimum: entropy")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
