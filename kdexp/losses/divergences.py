"""Token-level divergences between a teacher distribution p and a student distribution q.

Every divergence here is a pure function
``(student_logits [..., V], teacher_logits [..., V], *, temperature, ...) -> [...]``:
both softmaxes are taken over ``logits / temperature`` in float32, the result is summed over
the vocabulary, and nothing is masked or averaged. Masks, weights and the normalization by
the global number of tokens happen once, in :mod:`kdexp.losses.objective`. ``docs/losses.md``
has one row per divergence (formula, paper, behaviour, other codebases' conventions).

Numerics, shared by all of them:

* Everything is computed in float32 (float64 inputs: float64) from ``log_softmax``; probabilities are ``exp`` of the
  exact log-probabilities, so an entry whose logit is ``-inf`` has probability exactly 0.
* Inside logarithms, a log-probability of exactly ``-inf`` (an entry masked out of one model:
  a ``-inf`` logit) stands as ``NEG_INF_STANDIN = log(1.18e-38)``, the log of the smallest
  normal float32. This keeps values and gradients finite when an entry is ``-inf`` in one
  model only. Finite log-probabilities are never moved, however small (a student's log q of
  -91 on a token the teacher supports keeps its value and its gradient ``q - p``).
* Mixtures are formed in log space (``logaddexp`` of finite log-probabilities): there is no
  log of a sum of probabilities anywhere, and no ``exp`` that can overflow where a factor
  that multiplies it underflows (Amari's alpha-divergence switches form, see there).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from kdexp.losses import catalog
from kdexp.registry import Registry

DIVERGENCES: Registry = Registry("loss")


def implements(name: str):
    """Register the divergence declared as ``name`` in :mod:`kdexp.losses.catalog`; its keyword
    parameters must be the declared ones (and ``temperature``)."""

    def add(fn):
        keywords = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
        declared = {"temperature"} | {p.name for p in catalog.DECLARED[name].params}
        if keywords != declared:
            raise TypeError(f"divergence {name}: keyword parameters {sorted(keywords)} differ from its "
                            f"record's {sorted(declared)} (kdexp/losses/catalog.py)")
        DIVERGENCES.add(name, fn, description=catalog.DECLARED[name].description)
        return fn

    return add

NEG_INF_STANDIN = math.log(torch.finfo(torch.float32).tiny)  # -87.34, for -inf entries only


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` in float32 (float64 stays float64). [..., V] -> [..., V]"""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.log_softmax(logits / temperature, dim=-1)


def finite(log_p: torch.Tensor) -> torch.Tensor:
    """``log_p`` with its ``-inf`` entries replaced by ``NEG_INF_STANDIN``; every finite entry,
    and its gradient, is left exactly as it is (no clamp)."""
    return torch.where(log_p == float("-inf"), NEG_INF_STANDIN, log_p)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), with 0 log 0 = 0. [..., V] -> [...]

    ``p`` is ``exp(log_p)`` (exactly 0 where ``log_p = -inf``); a ``-inf`` in either log stands
    as a finite number, so the difference is finite and the product is 0, not NaN, at entries
    outside p's support.
    """
    return (log_p.exp() * (finite(log_p) - finite(log_q))).sum(-1)


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` from finite logs, exact at w = 0 and w = 1."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    return torch.logaddexp(math.log(w) + log_a, math.log1p(-w) + log_b)


@implements("fkl")
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, KL(p_teacher || q_student), per position. [..., V] x [..., V] -> [...]

    The classic token-level KD objective (Hinton, Vinyals & Dean, "Distilling the Knowledge in
    a Neural Network", NIPS DL workshop 2015; Kim & Rush, EMNLP 2016, Eq. 5 for sequences).
    """
    return kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


@implements("rkl")
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL, KL(q_student || p_teacher), per position. [..., V] x [..., V] -> [...]

    Token-level reverse KL as used for LLM distillation by MiniLLM (Gu, Dong, Wei & Huang,
    "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024, Eq. 1) and GKD
    (Agarwal et al., ICLR 2024, Sec. 3).
    """
    return kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


@implements("jsd")
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, per position. [..., V] x [..., V] -> [...]

    With m = beta * p + (1 - beta) * q: ``beta * KL(p || m) + (1 - beta) * KL(q || m)``
    (Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD), ICLR 2024, Eq. 3 and its footnote). The mixture formula tends to 0 at both
    ends, so, following TRL's GKD trainer, ``beta = 0`` is exactly fkl and ``beta = 1`` exactly
    rkl. DistiLLM's ``js_distance(lam)`` is ``beta = 1 - lam`` here.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = log_mix(finite(log_p), finite(log_q), beta)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


@implements("tvd")
def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_v |p_v - q_v|``, per position.

    Used as a KD loss by Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation" (ACL 2023, Table 1) and as a baseline by DistiLLM (Ko et al., ICML 2024).
    """
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


@implements("skl")
def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
            temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL, ``KL(p || alpha * p + (1 - alpha) * q)``, per position.

    Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024, Eq. 4 (their ``lam`` is ``alpha`` here). ``alpha = 0`` is fkl.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    return kl(log_p, log_mix(finite(log_p), finite(log_q), alpha))


@implements("srkl")
def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL, ``KL(q || alpha * q + (1 - alpha) * p)``, per position.

    Ko et al., DistiLLM, ICML 2024, Eq. 5 (their ``lam`` is ``alpha``). ``alpha = 0`` is rkl.
    It is skew KL with the roles of the two models exchanged.
    """
    return skew_kl(teacher_logits, student_logits, temperature=temperature, alpha=alpha)


@implements("akl")
def adaptive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                temperature: float = 1.0, mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL, per position.

    Wu, Tao, Wang, Zhao & Wong, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models", COLING 2025, Eq. 10-12: the vocabulary sorted by
    teacher probability is split into a head, the smallest prefix whose teacher mass reaches
    ``mu`` (it always holds the top token), and a tail. With the detached gaps
    ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|``:
    ``g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl``.

    The head mask is built in sorted order and mapped back to vocabulary order before it
    meets ``q`` (the bug of one public port); p is the teacher, q the student (the other).
    The authors' code puts the token that crosses ``mu`` in the tail; here it is in the head,
    as the paper's definition reads.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    with torch.no_grad():
        p, q = log_p.exp(), log_q.exp()
        sorted_p, order = p.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # teacher mass strictly above each entry
        head_sorted = mass_before < mu
        head_sorted[..., 0] = True
        head = torch.empty_like(head_sorted).scatter_(-1, order, head_sorted)
        gap = (p - q).abs()
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), 0.5)
    return w_head * kl(log_p, log_q) + (1 - w_head) * kl(log_q, log_p)


def _ab_terms(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The summand of the alpha-beta divergence for each case of (alpha, beta). [..., V]"""
    lp, lq = finite(log_p), finite(log_q)
    if alpha == 0 and beta == 0:
        return 0.5 * (lp - lq) ** 2
    if beta == 0:  # 1/a^2 (p^a log(p^a / q^a) - p^a + q^a)
        pa, qa = (alpha * lp).exp(), (alpha * lq).exp()
        return (pa * alpha * (lp - lq) - pa + qa) / alpha**2
    if alpha == 0:  # 1/b^2 (q^b log(q^b / p^b) - q^b + p^b)
        pb, qb = (beta * lp).exp(), (beta * lq).exp()
        return (qb * beta * (lq - lp) - qb + pb) / beta**2
    if alpha + beta == 0:  # 1/a^2 (log(q^a / p^a) + (q^a / p^a)^-1 - 1)
        d = alpha * (lq - lp)
        return (d + torch.expm1(-d)) / alpha**2
    s = alpha + beta
    mixed = (alpha * lp + beta * lq).exp()
    return -(mixed - alpha / s * (s * lp).exp() - beta / s * (s * lq).exp()) / (alpha * beta)


@implements("ab")
def alpha_beta(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0, alpha: float = 0.2, beta: float = 0.7) -> torch.Tensor:
    """Alpha-beta divergence, per position.

    ``-1/(alpha beta) sum [p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta)
    - beta/(alpha+beta) q^(alpha+beta)]`` (Cichocki, Cruces & Amari, Entropy 2011, Eq. 4;
    used for KD by Wang, Yang, Wang, Wang, Xu & Huang, "ABKD: Pursuing a Proper Allocation of
    the Probability Mass in Knowledge Distillation via alpha-beta-Divergence", ICML 2025).
    The limiting forms at alpha = 0, beta = 0, alpha = beta = 0 and alpha + beta = 0 are the
    continuous limits (factor 1/alpha^2 or 1/beta^2), so that (1, 0) is KL(p || q) and (0, 1)
    is KL(q || p). ABKD's code divides the limits by alpha (or beta) instead of its square,
    which agrees at alpha = 1 (beta = 1) only. Negative exponents make the divergence
    infinite where p or q is 0. A ``-inf`` entry stands as ``NEG_INF_STANDIN`` (-87.3), which
    keeps the value finite for negative exponents down to about -1; below, and wherever the
    true value exceeds float32 (finite entries are exact), it overflows to inf, and the loop
    skips such a step.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    return _ab_terms(log_p, log_q, float(alpha), float(beta)).sum(-1)


@implements("alpha")
def amari_alpha(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                temperature: float = 1.0, alpha: float = 0.5) -> torch.Tensor:
    """Amari alpha-divergence ``(1 - sum p^alpha q^(1-alpha)) / (alpha (1 - alpha))``.

    Amari, "Differential-Geometrical Methods in Statistics", 1985; for KD e.g. Wang et al.,
    "AlphaNet", ICML 2021. ``alpha = 1`` is exactly KL(p || q) and ``alpha = 0`` KL(q || p).
    With ``sum q = 1`` the numerator is ``-sum q expm1(alpha (log p - log q))`` (and the mirror
    form for alpha >= 1/2), which stays accurate next to the limits where the textbook form
    loses every digit to cancellation. Far outside [0, 1] (alpha >= 3 or <= -2) an entry that
    is ``-inf`` in one model only makes the value overflow to inf even with the stand-in.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    a = float(alpha)
    if a == 1:
        return kl(log_p, log_q)
    if a == 0:
        return kl(log_q, log_p)
    lp, lq = finite(log_p), finite(log_q)
    if a < 0.5:
        numerator = -_scaled_expm1(lq, a * (lp - lq)).sum(-1)
    else:
        numerator = -_scaled_expm1(lp, (1 - a) * (lq - lp)).sum(-1)
    return numerator / (a * (1 - a))


def _scaled_expm1(log_w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w * expm1(x)`` with ``w = exp(log_w)``, accurate and finite everywhere, gradients too.

    ``expm1`` keeps the digits for small ``x``; for ``x > 1`` the direct ``exp(log_w + x) - w``
    has no cancellation, and it cannot overflow where ``w`` underflows (``w * expm1(x)`` would
    be ``0 * inf``). Each branch is evaluated on bounded arguments only, so the branch that
    ``where`` discards has a finite gradient.
    """
    w = log_w.exp()
    return torch.where(x <= 1, w * torch.expm1(x.clamp_max(1)), (log_w + x.clamp_min(1)).exp() - w)


@implements("taid")
def taid(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
         temperature: float = 1.0, t: float = 0.5) -> torch.Tensor:
    """Temporally adaptive interpolated distillation loss at interpolation ``t``.

    Shing, Misaki, Bao, Yokoi & Akiba, "TAID: Temporally Adaptive Interpolated Distillation
    for Efficient Knowledge Transfer in Language Models", ICLR 2025, Eq. 4-5: the target
    ``p_t = softmax((1 - t) * stopgrad(student_logits) + t * teacher_logits)`` and the loss
    ``KL(p_t || q)``. Log-probabilities stand in for logits (softmax is shift invariant, and
    they are finite where logits are -inf). The schedule of ``t`` belongs to the TAID method.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    if t == 1:
        return kl(log_p, log_q)
    target = F.log_softmax((1 - t) * finite(log_q).detach() + t * finite(log_p), dim=-1)
    return kl(target, log_q)


@implements("amid")
def amid(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
         temperature: float = 1.0, alpha: float = -1.0, lam: float = 0.1,
         base: str = "fkl") -> torch.Tensor:
    """A base divergence between p and the alpha-mixture assistant r of p and q.

    Shin et al., "AMiD: Knowledge Distillation for LLMs with alpha-mixture Assistant
    Distribution", 2025: ``r ∝ (lam p^g + (1 - lam) q^g)^(1/g)`` with ``g = (1 - alpha) / 2``,
    and ``r ∝ p^lam q^(1 - lam)`` at alpha = 1, computed in log space; the loss is ``base``
    with p as the teacher and r as the student. alpha = -1 is the arithmetic mixture (with
    base fkl: DistiLLM's skew KL at ``lam``), alpha = 1 the geometric one; the defaults are
    that skew-KL point, not a value tuned by the paper.
    """
    log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    lp, lq = finite(log_p), finite(log_q)
    if alpha == 1:
        log_r = lam * lp + (1 - lam) * lq
    else:
        g = (1 - alpha) / 2
        log_r = log_mix(g * lp, g * lq, lam) / g
    return DIVERGENCES.get(base)(F.log_softmax(log_r, dim=-1), log_p)
