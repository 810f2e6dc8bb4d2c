"""Divergences between models with different tokenizers (``loss.cross_tokenizer``).

    per_position = uld(student_logits, teacher_logits)                   # [N, Vs] x [N, Vt] -> [N]
    # per span: the last token's log-distribution and the log-probability of the earlier tokens
    per_span = hybrid(last_s, last_t, matched_s, matched_t, beta=0.5,     # [K, Vs] x [K, Vt] -> [K]
                      prefix_s=prefix_s, prefix_t=prefix_t, direct=direct)
    rows = merged_rows(log_probs, ids, spans)    # last + prefix, the chain-rule row (the reference)

**ULD** (Boizard, El Haddad, Hudelot and Colombo, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs", arXiv 2402.12030, 2024): the two next-token
distributions, each sorted by probability and the shorter padded with zeros, compared by the sum
of absolute differences, the closed form of the Wasserstein-1 distance between them under a
uniform cost. It needs no shared vocabulary; it compares the shapes of the distributions, not
which token is likely. The response positions of the two sequences are paired from the start
(the shorter sets the number of pairs), as in the paper's code.

**Spans** (the approach of TRL's GOLD trainer, ``trl/experimental/gold``): the two
tokenizations of the same text are aligned into spans that cover the same characters
(:mod:`kdexp.losses.align`). A span's row on each side is its chain-rule probability: the
distribution predicting its last token, times the probability of its earlier tokens
(``merged_rows``; GOLD's "bayesian" merge). Rows are compared by a hybrid: on the tokens whose
string is the same in both vocabularies ("matched"), a generalized Jensen-Shannon divergence; on
the rest, ULD's sorted comparison. One departure from GOLD, on purpose: the matched part compares
*distributions* over the span's outcomes, "its earlier tokens then matched token i" for each
matched token plus one bucket for everything else, which sums to 1 and keeps the probability of
the earlier tokens (GOLD compares the raw sub-vectors, on which its JSD is not a divergence: it can
be negative and is not least where the rows agree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from kdexp.losses.divergences import generalized_jsd


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_i |sort(p)_i - sort(q)_i|`` over the last dimension, both sorted in decreasing order and
    the narrower zero-padded to the wider: ``[..., Vp]`` x ``[..., Vq]`` -> ``[...]``."""
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    q = F.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD per position: ``[N, Vs]`` x ``[N, Vt]`` -> ``[N]`` (float32), both at ``temperature``."""
    p = (student_logits.float() / temperature).softmax(-1)
    q = (teacher_logits.float() / temperature).softmax(-1)
    return sorted_l1(p, q)


def merged_rows(log_probs: torch.Tensor, ids: Sequence[int], groups: Sequence[range]) -> torch.Tensor:
    """One log-row per span: ``log_probs[k]`` is the distribution that predicts token ``ids[k]``
    (``[L, V]``); the row of span ``g`` is ``log_probs[g[-1]] + sum_{k in g[:-1]} log_probs[k, ids[k]]``,
    the log-probability of the span's earlier tokens then each possible last one. ``[K, V]``."""
    ids_t = torch.as_tensor(list(ids), device=log_probs.device)
    chosen = log_probs.gather(1, ids_t[:, None]).squeeze(1)  # [L]
    zero = chosen.new_zeros(1)
    before = torch.cat([zero, chosen.cumsum(0)])  # before[k] = sum of chosen[:k]
    last = torch.as_tensor([g[-1] for g in groups], device=log_probs.device)
    first = torch.as_tensor([g[0] for g in groups], device=log_probs.device)
    prefix = before[last] - before[first]  # the span's tokens before its last
    return log_probs[last] + prefix[:, None]


def matched_ids(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> tuple[list[int], list[int]]:
    """The ids of the token strings both vocabularies hold, in the same order on both sides."""
    common = sorted(set(student_vocab) & set(teacher_vocab), key=lambda s: student_vocab[s])
    return [student_vocab[s] for s in common], [teacher_vocab[s] for s in common]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``; ``-inf`` at 0 with a finite (zero) gradient."""
    inside = x < -1e-12
    safe = torch.where(inside, x, torch.full_like(x, -1.0))
    return torch.where(inside, torch.log(-torch.expm1(safe)), torch.full_like(x, float("-inf")))


def _coarse(last: torch.Tensor, prefix: torch.Tensor, matched: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The span's outcomes as a log-distribution: "its earlier tokens, then matched token i" for
    each matched token (``prefix + last[i]``), and one bucket for everything else (the earlier
    tokens then an unmatched token, or other earlier tokens: ``1 - P(prefix) + P(prefix) P(unmatched)``),
    each computed exactly. ``last``: normalized log-rows ``[K, V]``; ``prefix`` ``[K]`` (<= 0)."""
    prefix = prefix.clamp(max=0.0)[:, None]
    inside = last[:, matched] + prefix
    unmatched = last[:, keep].logsumexp(-1, keepdim=True) + prefix if keep.any() else torch.full_like(prefix, float("-inf"))
    rest = torch.logaddexp(_log1mexp(prefix), unmatched)
    return torch.cat([inside, rest], -1)


def hybrid(rows_s: torch.Tensor, rows_t: torch.Tensor, matched_s: Sequence[int], matched_t: Sequence[int],
           beta: float = 0.5, matched_weight: float | None = None, divergence: Callable | None = None,
           prefix_s: torch.Tensor | None = None, prefix_t: torch.Tensor | None = None,
           direct: torch.Tensor | None = None) -> torch.Tensor:
    """Span rows compared. ``rows_*``: each span's last-token log-distribution (normalized, ``[K, V]``),
    ``prefix_*``: the log-probability of its earlier tokens (``[K]``, default 0: one-token spans).
    ``w`` times ``divergence(student, teacher)`` (any of kdexp's, given log-distributions; default
    JSD(beta), kdexp's ``loss=jsd``: beta 0 is forward KL, 1 reverse KL) on the span's outcomes
    through matched tokens plus one bucket for the rest (:func:`_coarse`), ``+ (1 - w)`` ULD's sorted
    L1 on the chain-rule probabilities of the unmatched tokens. ``w``: ``matched_weight``, or the
    matched share of the teacher's vocabulary (GOLD's default). ``direct`` ``[K]`` (default all 1):
    where 0, the two last tokens do not continue the same text (the earlier tokens cover different
    text: ``" word"`` against ``" ", "word"``), so matched strings are not the same outcome and the
    row takes the sorted comparison alone. ``[K, Vs]`` x ``[K, Vt]`` -> ``[K]``."""
    ms = torch.as_tensor(list(matched_s), dtype=torch.long, device=rows_s.device)
    mt = torch.as_tensor(list(matched_t), dtype=torch.long, device=rows_t.device)
    w = len(ms) / rows_t.shape[-1] if matched_weight is None else float(matched_weight)
    rows_s, rows_t = _at_least_float32(rows_s), _at_least_float32(rows_t)
    prefix_s = rows_s.new_zeros(rows_s.shape[0]) if prefix_s is None else _at_least_float32(prefix_s)
    prefix_t = rows_t.new_zeros(rows_t.shape[0]) if prefix_t is None else _at_least_float32(prefix_t)
    keep_s = torch.ones(rows_s.shape[-1], dtype=torch.bool, device=rows_s.device)
    keep_t = torch.ones(rows_t.shape[-1], dtype=torch.bool, device=rows_t.device)
    keep_s[ms], keep_t[mt] = False, False
    w = rows_s.new_full((rows_s.shape[0],), w) * (1.0 if direct is None else direct.to(rows_s))
    out = rows_s.new_zeros(rows_s.shape[0])
    if len(ms):
        # normalized log-distributions are their own logits
        coarse_s, coarse_t = _coarse(rows_s, prefix_s, ms, keep_s), _coarse(rows_t, prefix_t, mt, keep_t)
        out = out + w * (generalized_jsd(coarse_s, coarse_t, beta=beta) if divergence is None
                         else divergence(coarse_s, coarse_t))
    indirect = w < 1  # the rows the sorted comparison weighs
    if indirect.any():
        # where the last tokens continue different text, every token is compared sorted
        other = (~direct.bool() if direct is not None else torch.zeros_like(w, dtype=torch.bool))[:, None]
        ks, kt = keep_s[None] | other, keep_t[None] | other
        ps, pt = (rows_s + prefix_s[:, None]).exp() * ks, (rows_t + prefix_t[:, None]).exp() * kt
        out = out + (1 - w) * sorted_l1(ps, pt)
    return out


def _gather_rows(logits: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The coordinates (b, t) of the valid (>= 0) entries of ``where`` [B, T] and their values."""
    b, p = (where >= 0).nonzero(as_tuple=True)
    return b, p, where[b, p]


def _chosen_before(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, T + 1]``: the sum of the log-probabilities of the targets at the positions before each
    (0 where there is no target)."""
    from kdexp.losses.objective import IGNORE_INDEX

    valid = targets != IGNORE_INDEX
    chosen = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * valid
    return F.pad(chosen.cumsum(-1), (1, 0))


def uld_positions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: Mapping[str, torch.Tensor],
                  temperature: float) -> torch.Tensor:
    """ULD at every student position paired with a teacher position (``batch["x_pos"]``, -1: none),
    0 elsewhere: ``[B, Ts, Vs]`` x ``[B, Tt, Vt]`` -> ``[B, Ts]``."""
    b, p, tp = _gather_rows(student_logits, batch["x_pos"])
    out = student_logits.new_zeros(student_logits.shape[:2], dtype=torch.float32)
    out[b, p] = uld(student_logits[b, p], teacher_logits[b, tp], temperature)
    return out


def span_positions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: Mapping[str, torch.Tensor],
                   divergence: Callable, temperature: float, matched_weight: float | None) -> torch.Tensor:
    """The hybrid loss of every aligned span at the student position that predicts the span's last
    token (``batch["x_pos"]``: the teacher's, -1 elsewhere); the rows are chain-rule rows from the
    spans' first positions (``x_first_s``, ``x_first_t``) and each side's targets. ``[B, Ts]``."""
    log_s = (student_logits.float() / temperature).log_softmax(-1)
    log_t = (teacher_logits.float() / temperature).log_softmax(-1)
    before_s = _chosen_before(log_s, batch["targets"])
    before_t = _chosen_before(log_t, batch["x_targets"])
    b, p, tp = _gather_rows(student_logits, batch["x_pos"])
    prefix_s = before_s[b, p] - before_s[b, batch["x_first_s"][b, p]]
    prefix_t = before_t[b, tp] - before_t[b, batch["x_first_t"][b, p]]
    out = log_s.new_zeros(log_s.shape[:2])
    out[b, p] = hybrid(log_s[b, p], log_t[b, tp], batch["x_matched_s"].tolist(), batch["x_matched_t"].tolist(),
                       matched_weight=matched_weight, divergence=divergence, prefix_s=prefix_s, prefix_t=prefix_t,
                       direct=batch["x_direct"][b, p])
    return out


def cross_term(term, name: str, approach: str, params: dict, matched_weight: float | None):
    """A divergence term of the config (``loss=NAME`` and its parameters) made to compare a teacher
    with another tokenizer (``loss.cross_tokenizer``): ``uld`` replaces the divergence by ULD's
    sorted comparison; ``span`` keeps it for the matched tokens of aligned spans. Computed on the
    plain path (the fused and chunked paths assume one vocabulary)."""
    from kdexp import losses

    temperature = float(params.get("temperature", 1.0))
    if approach == "uld":
        def fn(s, t, b):
            return uld_positions(s, t, b, temperature)
    else:
        # the rows are already at the temperature and normalized: the divergence reads them at 1
        div = losses.divergence(name, **{**params, "temperature": 1.0, "chunk_size": None})

        def fn(s, t, b):
            return span_positions(s, t, b, div, temperature, matched_weight)
    return replace(term, name=f"{name}_span" if approach == "span" else "uld", fn=fn, kind="term",
                   cross=approach)
