"""Model-free analyses of a distilled student against its teacher.

Every function takes tensors (or lists of floats / strings) and returns floats, dicts of lists,
or tensors: nothing here loads a model, reads a file or plots. Argument order follows
:mod:`kdexp.losses.divergences`: ``(student_logits, teacher_logits, ...)``; "KL" is always
KL(p_teacher || q_student), computed in float32 from ``log_softmax``.

* per-position KL, top-1 agreement and per-step curves with standard errors;
* exposure bias: accumulated regret and excess error (Arora et al., Findings of ACL 2022);
* token difficulty buckets by teacher uncertainty (Rao et al., arXiv 2409.12512, 2024);
* calibration: ECE / MCE and a reliability diagram (Guo et al., ICML 2017);
* diversity: distinct-n (Li et al., NAACL 2016) and self-BLEU (Zhu et al., SIGIR 2018);
* speculative decoding acceptance rate (Leviathan et al., ICML 2023; Chen et al., 2023).
* routing of mixture-of-experts models: top-k agreement, router entropy, load per expert.

Ratios that are undefined (an empty bin, a zero denominator) are ``nan``, never an exception.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from kdexp.losses.divergences import kl, log_probs

__all__ = ["CalibrationAccumulator", "DifficultyAccumulator", "acceptance_rate", "difficulty_buckets",
           "distinct_n", "ece", "expert_load", "expert_overlap", "exposure_metrics", "kl_per_position",
           "per_position_mean", "per_step_mean", "routing_entropy", "self_bleu", "sentence_bleu", "top1_agreement"]

NAN = float("nan")


def _valid_rows(mask: torch.Tensor | None, lead: torch.Size, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The positions where ``mask`` [*lead] is True (all if None): [*lead, *rest] -> [N, *rest] each."""
    if mask is None:
        return [t.reshape(-1, *t.shape[len(lead):]) for t in tensors]
    return [t[mask.bool()] for t in tensors]


# ---------------------------------------------------------------------------------------------
# Per-position divergence, agreement and curves
# ---------------------------------------------------------------------------------------------

def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_teacher || q_student) per position, 0 where ``mask`` is False. [B, T, V] x2, [B, T] -> [B, T]

    Forward KL as in Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
    (NIPS DL workshop 2015); float32 from ``log_softmax``, see :func:`kdexp.losses.divergences.kl`.
    """
    out = kl(log_probs(teacher_logits), log_probs(student_logits))
    return out if mask is None else out.masked_fill(~mask.bool(), 0.0)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   mask: torch.Tensor | None = None) -> float:
    """Percentage of valid positions where argmax student == argmax teacher. [..., V] x2, [...] -> float

    ``nan`` when no position is valid.
    """
    same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    (same,) = _valid_rows(mask, same.shape, same)
    return 100.0 * same.double().mean().item() if same.numel() else NAN


def per_position_mean(values: torch.Tensor, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over the batch at each position, only where the position exists. [B, T], [B, T] -> 3 x [T]

    Returns ``(mean, stderr, count)`` in float64 (count: int64). ``stderr`` is the standard error
    of the mean across samples, ``std(ddof=1) / sqrt(count)``, for error bars. Where
    ``count == 0`` mean and stderr are ``nan``; where ``count == 1`` stderr is ``nan``.
    """
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    m, x = mask.bool(), values.double()
    zero = torch.zeros_like(x)
    count = m.double().sum(0)
    mean = torch.where(m, x, zero).sum(0) / count  # torch.where, not x * m: padding may hold nan
    sq = torch.where(m, (x - mean) ** 2, zero).sum(0)
    stderr = (sq / (count - 1)).sqrt() / count.sqrt()
    stderr = torch.where(count > 1, stderr, torch.full_like(stderr, NAN))
    return mean, stderr, count.long()


def per_step_mean(values: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [T], count [T])`` of :func:`per_position_mean`, e.g. eps_t from per-position KL."""
    mean, _, count = per_position_mean(values, mask)
    return mean, count


# ---------------------------------------------------------------------------------------------
# Exposure bias
# ---------------------------------------------------------------------------------------------

def exposure_metrics(eps_t: Sequence[float] | torch.Tensor,
                     regret_t: Sequence[float] | torch.Tensor) -> dict[str, list[float]]:
    """Accumulated and excess accumulated error for every length l = 1..L. [L], [L] -> dict of [L]

    Arora, El Asri, Bahuleyan & Cheung, "Why Exposure Bias Matters: An Imitation Learning
    Perspective of Error Accumulation in Language Generation" (Findings of ACL 2022), the
    definitions of AccErr and %ExAccErr. With ``eps_t[t]`` the mean per-step loss (here
    KL(p||q)) at step t+1 under teacher-generated prefixes and ``regret_t[t]`` the same under
    student-generated prefixes,

    * ``R(l) = sum_{t<=l} regret_t``,  ``eps(l) = mean_{t<=l} eps_t``,
    * ``AccErr(l) = R(l) / eps(l)``,
    * ``ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) * 100`` (% of error due to exposure bias).

    Keys "l", "R", "eps", "AccErr", "ExAccErr". Where ``eps(l) == 0`` (e.g. student == teacher)
    both ratios are ``nan``.
    """
    eps = torch.as_tensor(eps_t, dtype=torch.float64).flatten()
    regret = torch.as_tensor(regret_t, dtype=torch.float64).flatten()
    if eps.shape != regret.shape:
        raise ValueError(f"eps_t and regret_t must have the same length, got {len(eps)} and {len(regret)}")
    length = torch.arange(1, len(eps) + 1, dtype=torch.float64)
    big_r = regret.cumsum(0)
    eps_l = eps.cumsum(0) / length
    zero = eps_l == 0
    safe = torch.where(zero, torch.ones_like(eps_l), eps_l)
    acc = torch.where(zero, torch.full_like(eps_l, NAN), big_r / safe)
    excess = torch.where(zero, torch.full_like(eps_l, NAN), (big_r - length * eps_l) / (length * safe) * 100)
    return {"l": [int(i) for i in length.tolist()], "R": big_r.tolist(), "eps": eps_l.tolist(),
            "AccErr": acc.tolist(), "ExAccErr": excess.tolist()}


# ---------------------------------------------------------------------------------------------
# Binned statistics (difficulty buckets, calibration)
# ---------------------------------------------------------------------------------------------

def _equal_width_bin(x: torch.Tensor, n_bins: int, *, right_closed: bool) -> torch.Tensor:
    """Bin index of ``x`` in [0, 1] for ``n_bins`` equal-width bins. [N] -> [N] int64

    ``right_closed=False``: bins ``[i/n, (i+1)/n)`` with the last one closed at 1.
    ``right_closed=True``: bins ``(i/n, (i+1)/n]`` with the first one closed at 0.
    """
    inner = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=x.device)[1:-1]
    return torch.bucketize(x.double(), inner, right=not right_closed).clamp(0, n_bins - 1)


class _BinSums:
    """Per-bin float64 sums of named quantities, so that batches can be added one at a time."""

    def __init__(self, n_bins: int, names: Sequence[str]):
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.sums = {k: torch.zeros(n_bins, dtype=torch.float64) for k in names}

    def add(self, idx: torch.Tensor, **values: torch.Tensor) -> None:
        idx = idx.cpu()
        self.count += torch.bincount(idx, minlength=self.n_bins).double()
        for k, v in values.items():
            self.sums[k] += torch.bincount(idx, weights=v.detach().double().cpu(), minlength=self.n_bins)

    def means(self) -> dict[str, torch.Tensor]:
        empty = self.count == 0
        return {k: torch.where(empty, torch.full_like(s, NAN), s / self.count.clamp_min(1))
                for k, s in self.sums.items()}


class DifficultyAccumulator:
    """Streaming version of :func:`difficulty_buckets`: ``.add`` batches, then ``.result()``."""

    def __init__(self, n_buckets: int = 10):
        self._bins = _BinSums(n_buckets, ["unc", "student_logit_std", "kl", "agree"])

    def add(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            mask: torch.Tensor | None = None) -> None:
        """Add a batch: logits [..., V], targets [...], mask [...] (True = scored; targets there
        may hold an ignore index)."""
        s, t, y = _valid_rows(mask, targets.shape, student_logits, teacher_logits, targets)
        log_p = log_probs(t)
        unc = (1 - log_p.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).exp()).clamp(0, 1)
        s32 = s if s.dtype == torch.float64 else s.float()
        self._bins.add(_equal_width_bin(unc, self._bins.n_bins, right_closed=False),
                       unc=unc, student_logit_std=s32.std(-1, correction=0),
                       kl=kl(log_p, log_probs(s)), agree=(s.argmax(-1) == t.argmax(-1)).double())

    def result(self) -> dict[str, list[float]]:
        """Keys: "edges" [n+1], and per bucket "count", "unc", "student_logit_std", "kl",
        "top1_agreement" (%); empty buckets have count 0 and nan elsewhere."""
        m = self._bins.means()
        n = self._bins.n_bins
        return {"edges": [i / n for i in range(n + 1)], "count": [int(c) for c in self._bins.count.tolist()],
                "unc": m["unc"].tolist(), "student_logit_std": m["student_logit_std"].tolist(),
                "kl": m["kl"].tolist(), "top1_agreement": (100 * m["agree"]).tolist()}


def difficulty_buckets(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                       n_buckets: int = 10) -> dict[str, list[float]]:
    """Statistics per bucket of token difficulty. [N, V] x2, [N] -> dict (see ``DifficultyAccumulator.result``)

    Difficulty is the teacher's uncertainty about the reference token, ``UNC = 1 -
    softmax(teacher)[target]`` (Rao et al., "Exploring and Enhancing the Transfer of Distribution
    in Knowledge Distillation for Autoregressive Language Models", arXiv 2409.12512, 2024).
    Bucket i covers ``[i/n, (i+1)/n)``, the last one ``[1 - 1/n, 1]``. Per bucket: count, mean
    UNC, mean population std over the vocabulary of the raw student logits, mean
    KL(teacher || student), and top-1 agreement in %. Positions are already the valid ones.
    """
    acc = DifficultyAccumulator(n_buckets)
    acc.add(student_logits, teacher_logits, targets)
    return acc.result()


def _calibration_result(bins: _BinSums, mce_min_share: float = 0.0) -> dict[str, object]:
    m = bins.means()
    gap = (m["accuracy"] - m["confidence"]).abs()
    n = bins.count.sum()
    filled = (bins.count > 0) & (bins.count >= mce_min_share * n)
    k = bins.n_bins
    return {"ece": (bins.count * gap.nan_to_num(0)).sum().item() / n.item() if n > 0 else NAN,
            "mce": gap[filled].max().item() if filled.any() else NAN,
            "n": int(n.item()), "edges": [i / k for i in range(k + 1)],
            "count": [int(c) for c in bins.count.tolist()],
            "confidence": m["confidence"].tolist(), "accuracy": m["accuracy"].tolist()}


class CalibrationAccumulator:
    """Streaming version of :func:`ece` on logits: ``.add`` batches, then ``.result()``."""

    def __init__(self, n_bins: int = 15, mce_min_share: float = 0.0):
        self._bins = _BinSums(n_bins, ["confidence", "accuracy"])
        self.mce_min_share = mce_min_share

    def add_predictions(self, confidences: torch.Tensor, correct: torch.Tensor) -> None:
        """Add (confidence [N] in [0, 1], correct [N] bool) pairs."""
        self._bins.add(_equal_width_bin(confidences, self._bins.n_bins, right_closed=True),
                       confidence=confidences, accuracy=correct.double())

    def add(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: logits [..., V], targets [...], mask [...]. Confidence = max softmax
        probability, correct = (argmax == target)."""
        z, y = _valid_rows(mask, targets.shape, logits, targets)
        conf, pred = log_probs(z).max(-1)
        self.add_predictions(conf.exp(), pred == y)

    def result(self) -> dict[str, object]:
        """Same keys as :func:`ece`; MCE over the bins holding at least ``mce_min_share`` of the
        predictions (0: every non-empty bin, Guo et al.'s definition)."""
        return _calibration_result(self._bins, self.mce_min_share)


def ece(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> dict[str, object]:
    """Expected and maximum calibration error with reliability-diagram bins. [N], [N] bool -> dict

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks" (ICML 2017):
    equal-width bins ``((m-1)/M, m/M]`` over (0, 1] (a confidence of exactly 0 joins the first),
    ``ECE = sum_m |B_m|/n |acc(B_m) - conf(B_m)|`` (Eq. 3) and ``MCE = max_m |acc - conf|`` over
    non-empty bins (Eq. 5). Both are fractions in [0, 1] (nan when N == 0).

    Keys: "ece", "mce", "n", "edges" [M+1], and per bin "count", "confidence" (mean), "accuracy"
    (fraction correct); empty bins have count 0 and nan means.
    """
    acc = CalibrationAccumulator(n_bins)
    acc.add_predictions(torch.as_tensor(confidences).flatten(), torch.as_tensor(correct).flatten())
    return acc.result()


# ---------------------------------------------------------------------------------------------
# Speculative decoding
# ---------------------------------------------------------------------------------------------

def acceptance_rate(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Expected acceptance probability of a student draft token under the teacher. [..., V] x2 -> [...]

    ``alpha = sum_x min(p(x), q(x)) = 1 - TVD(p, q)`` with p the teacher (target) and q the
    student (draft): Leviathan, Kalman & Matias, "Fast Inference from Transformers via
    Speculative Decoding" (ICML 2023, Sec. 3: beta = 1 - D_LK(p, q)); Chen et al.,
    "Accelerating Large Language Model Decoding with Speculative Sampling" (arXiv 2302.01318, 2023).
    """
    return torch.minimum(log_probs(teacher_logits), log_probs(student_logits)).exp().sum(-1)


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts routing
# ---------------------------------------------------------------------------------------------

def expert_overlap(chosen_a: torch.Tensor, chosen_b: torch.Tensor) -> torch.Tensor:
    """The share of the experts two routings have in common. [..., k] x2 -> [...] in [0, 1]

    ``|A ∩ B| / k`` per position for the sets of ``k`` experts chosen: 1 where the same experts
    are chosen (whatever their order), 0 where none is shared."""
    k = chosen_a.shape[-1]
    return (chosen_a[..., :, None] == chosen_b[..., None, :]).any(-1).sum(-1).double() / k


def routing_entropy(router_probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the router's distribution over the experts. [..., E] -> [...]

    ``log E`` for a uniform router, 0 for one certain of a single expert (``0 log 0 = 0``)."""
    p = router_probs.double()
    return -torch.special.xlogy(p, p).sum(-1)


def expert_load(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """The share of the assignments each expert receives. [N, k] -> [E], summing to 1

    ``1 / E`` each when the load is balanced (``f_i`` of the Switch Transformer's
    load-balancing loss, Fedus et al., JMLR 2022, Eq. 4, over top-k routing); nan for N = 0."""
    if chosen.shape[0] == 0:
        return torch.full((experts,), NAN, dtype=torch.float64)
    return torch.bincount(chosen.reshape(-1), minlength=experts).double() / chosen.numel()


# ---------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    """Lowercase, then split on whitespace (no punctuation handling)."""
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over the whole set of texts, in [0, 1].

    Li, Galley, Brockett, Gao & Dolan, "A Diversity-Promoting Objective Function for Neural
    Conversation Models" (NAACL 2016). Texts are lowercased and split on whitespace;
    n-grams do not cross text boundaries. 0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total: Counter = Counter()
    for text in texts:
        total.update(_ngrams(_tokens(text), n))
    return len(total) / sum(total.values()) if total else 0.0


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Smoothed sentence BLEU of a token list against reference token lists, in [0, 100].

    Papineni et al., "BLEU" (ACL 2002): modified n-gram precision (hypothesis counts clipped by
    the maximum count in any one reference), uniform geometric mean over n = 1..max_n, brevity
    penalty ``exp(1 - r/c)`` when c <= r, with r the reference length closest to c (ties: the
    shorter). Smoothing: add one to numerator and denominator for n > 1 (Lin & Och, COLING 2004;
    "smoothing 2" of Chen & Cherry, WMT 2014), unigrams unsmoothed. So a hypothesis sharing no
    unigram with the references (or an empty one) scores exactly 0.
    """
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = _ngrams(hypothesis, n)
        best: Counter = Counter()
        for ref in references:
            best |= _ngrams(ref, n)  # element-wise max of counts
        matched = sum(min(k, best[g]) for g, k in hyp.items())
        total = sum(hyp.values())
        if n > 1:
            matched, total = matched + 1, total + 1
        if matched == 0:
            return 0.0
        log_p += math.log(matched / total) / max_n
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    log_bp = min(0.0, 1 - r / c)
    return 100.0 * math.exp(log_bp + log_p)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Mean over i of :func:`sentence_bleu` of text i against all other texts, in [0, 100].

    Zhu et al., "Texygen: A Benchmarking Platform for Text Generation Models" (SIGIR 2018).
    Higher means less diverse. Tokenization as in :func:`distinct_n`. Needs at least two texts.
    """
    if len(texts) < 2:
        raise ValueError(f"self_bleu needs at least two texts, got {len(texts)}")
    toks = [_tokens(t) for t in texts]
    scores = [sentence_bleu(h, toks[:i] + toks[i + 1:], max_n) for i, h in enumerate(toks)]
    return sum(scores) / len(scores)
