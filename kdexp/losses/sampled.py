"""Teacher distributions given by samples: unbiased estimates of a divergence from n tokens
drawn from the teacher at each position (``teacher.sparse=sampled``).

    ids, counts = draw(teacher_log_probs, n=12, generator=g)        # [N, S], [N, S], S <= n
    target = Sampled(ids, counts / n, teacher_log_probs.gather(-1, ids))
    per_position = estimator("fkl", {"temperature": 2.0})(student_logits, target)

**Why.** A top-k teacher (a cache, a server) keeps the k most likely tokens and spreads the
rest of the mass evenly: the target it rebuilds is not the teacher's distribution, and no
amount of data removes the difference. Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee and Lee,
"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (ACL 2025, Sec. 3) show
that this bias miscalibrates the student, and that tokens *sampled* from the teacher, with
importance weights, give an estimate of the distillation loss and of its gradient that is
unbiased, from about a dozen tokens per position.

**What is drawn.** At each position, n tokens ``x_1..x_n`` i.i.d. from ``p``, the teacher's
distribution at the loss temperature T (``softmax(z / T)``), stored as the distinct tokens, how
often each was drawn, and ``log p`` of each. The proposal is the target itself, so every
importance weight ``p(x) / p(x)`` is 1 and a token's weight is its share of the draws,
``w = count / n``: the weights sum to 1 and are unbiased, ``E[w_v] = p_v``. (A proposal other
than the target, e.g. the paper's tempered ``p^t``, needs weights ``count / n * p / q``: unbiased
but not summing to 1, or normalized to sum to 1, which is biased at finite n. kdexp draws from
the target, where the two coincide.) ``p`` is drawn at the loss temperature because that is the
distribution the loss compares: draws at 1 could be reweighted to T (weights ``p^(1/T - 1) / Z_T``,
one more number per position), but for T > 1 those weights grow without bound in the tail.

**The estimators.** A divergence that is an expectation under p of a function of the two
probabilities at one token, ``D = sum_v p_v g(p_v, q_v) = E_{x ~ p}[g(p_x, q_x)]``, is estimated
without bias by ``D_hat = sum_j w_j g(p_{x_j}, q_{x_j})``, and, since p does not depend on the
student, ``grad D_hat`` estimates ``grad D`` without bias too. Three of the library's divergences
are estimated so, each with a gradient of bounded variance:

* ``fkl``: ``g = log p - log q``. Its gradient in the student's logits at T is ``(q - w) / T``
  (with ``w`` the weights spread over the vocabulary): CE against the empirical distribution of
  the draws, the paper's estimator (Sec. 3.2). Its covariance is the multinomial one,
  ``(diag(p) - p p^T) / (n T^2)``, whatever the student.
* ``skl`` (DistiLLM's skew KL, ``KL(p || a p + (1 - a) q)``): ``g = log p - log(a p + (1 - a) q)``.
* ``tvd``: ``0.5 sum |p - q| = sum (p - q)^+``, so ``g = (1 - q / p)^+``, in [0, 1] at every draw.

The value's variance is ``Var_{x ~ p}[g(p_x, q_x)] / n``: finite (fkl's and skl's g grow like a
logarithm where p is small), though not bounded over all students. The value of one draw can be
below 0 for fkl and skl (an estimate of a number >= 0, not a divergence of two distributions),
so, unlike :class:`kdexp.losses.bound.Bound`, it is not clamped: clamping would bias it. The
cache stores log p in float16, so "unbiased" holds up to that rounding (about 1e-3 on a value).

The other divergences are refused (:func:`problems`). rkl and srkl weigh tokens by the student:
as an expectation under p they need the weight ``q / p``, whose variance ``sum_v q_v^2 / p_v``
has no bound. jsd, alpha and ab have sound forms for some of their parameters (jsd once the
student-only constant is split off, alpha for alpha in [1/2, 1]) that are not implemented; akl,
taid and amid depend on the whole distribution (a sort, a normalization).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kdexp.losses.divergences import log_mix, log_probs

SUPPORTED = ("fkl", "skl", "tvd")  # divergences with an unbiased estimator of bounded gradient variance


@dataclass
class Sampled:
    """A teacher given by draws: ``S`` slots per position of token ids, weights (each token's
    share of the n draws; 0 in unused slots) and the teacher's log-probability of each at the
    loss temperature. The three tensors share any leading shape ``[..., S]``; ``mask`` [B, T]:
    the positions a ``[N, S]`` target covers, in order (the fused path's rows)."""

    ids: torch.Tensor      # [..., S] int64
    weights: torch.Tensor  # [..., S] float32, summing to 1 at a covered position
    log_p: torch.Tensor    # [..., S] float32
    mask: torch.Tensor | None = None

    def __getitem__(self, index) -> Sampled:
        return Sampled(self.ids[index], self.weights[index], self.log_p[index])

    def detach(self) -> Sampled:
        return self  # never has a gradient

    @property
    def slots(self) -> int:
        return self.ids.shape[-1]

    def select(self, index: torch.Tensor):
        """The fused path's rows (:class:`kdexp.losses.fused.Rows`): the positions ``index``,
        which must be the covered ones."""
        from kdexp.losses.fused import Rows

        covered = self.mask.reshape(-1).nonzero().squeeze(1)
        if not torch.equal(covered.to(index.device), index):
            raise RuntimeError("a sampled teacher covers other positions than the loss asks for")
        return Rows((self.ids, self.weights, self.log_p), (), Sampled, self.slots)

    def positions(self) -> Sampled:
        """The plain path's target: ``[B, T, S]``, empty (weight 0) outside ``mask``."""
        shape = (*self.mask.shape, self.slots)
        out = [torch.zeros(shape, dtype=t.dtype, device=self.mask.device) for t in (self.ids, self.weights, self.log_p)]
        for full, rows in zip(out, (self.ids, self.weights, self.log_p), strict=True):
            full[self.mask] = rows.to(full.device)
        return Sampled(*out)


def draw(log_p: torch.Tensor, n: int, generator: torch.Generator | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws with replacement from each row of ``log_p`` [N, V] (log-probabilities): the
    distinct tokens and their counts, ``[N, S]`` each with ``S = min(n, V)``, most drawn
    first; a row with fewer than S distinct tokens fills the rest with count 0."""
    picks = torch.multinomial(log_p.float().exp(), n, replacement=True, generator=generator)  # [N, n]
    counts = torch.zeros(log_p.shape, dtype=torch.int32, device=log_p.device)
    counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.int32))
    top = counts.topk(min(n, log_p.shape[-1]), dim=-1)
    return top.indices, top.values


def draw_seed(seed: int, tokens: Sequence[int]) -> int:
    """The seed of a sequence's draws: ``teacher.sample_seed`` and the sequence's tokens (its
    prompt and response together, as a served teacher receives them)."""
    key = int.from_bytes(hashlib.sha256(json.dumps([int(t) for t in tokens]).encode()).digest()[:8], "little") >> 1
    return (seed * 0x9E3779B97F4A7C15 + key) % 2**63


def draw_sequence(logits: torch.Tensor, tokens: Sequence[int], n: int, temperature: float, seed: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n draws at T at every position of one sequence that has a next token: ``logits`` [L, V]
    are the model's on ``tokens`` (L of them; the last position predicts nothing of the
    sequence). On the CPU, from a generator seeded by :func:`draw_seed`, so that a cache and a
    server draw the same tokens for the same sequence: ids, counts and log p at T, [L - 1, S]."""
    log_p = torch.log_softmax(logits[:len(tokens) - 1].float() / temperature, dim=-1).cpu()
    ids, counts = draw(log_p, n, torch.Generator().manual_seed(draw_seed(seed, tokens)))
    return ids, counts, log_p.gather(1, ids)


def _gathered(student_logits: torch.Tensor, target: Sampled, temperature: float) -> torch.Tensor:
    """The student's log-probabilities at T of the drawn tokens: the softmax over its whole
    vocabulary, read at the slots. [..., V] -> [..., S]"""
    return log_probs(student_logits, temperature).gather(-1, target.ids.to(student_logits.device))


def _slots(student_logits: torch.Tensor, target: Sampled, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log q)`` at the slots, log p set to 0 in unused slots (weight 0, whatever their
    token: its log p may be -inf, which would make a NaN of the weight 0 or of a gradient)."""
    log_p = torch.where(target.weights > 0, target.log_p, 0.0)
    return log_p, _gathered(student_logits, target, temperature)


def _fkl(student_logits: torch.Tensor, target: Sampled, *, temperature: float) -> torch.Tensor:
    log_p, log_q = _slots(student_logits, target, temperature)
    return (target.weights * (log_p - log_q)).sum(-1)


def _skl(student_logits: torch.Tensor, target: Sampled, *, temperature: float, alpha: float) -> torch.Tensor:
    log_p, log_q = _slots(student_logits, target, temperature)
    return (target.weights * (log_p - log_mix(log_p, log_q, alpha))).sum(-1)


def _tvd(student_logits: torch.Tensor, target: Sampled, *, temperature: float) -> torch.Tensor:
    log_p, log_q = _slots(student_logits, target, temperature)
    return (target.weights * (1 - (log_q - log_p).exp()).clamp_min(0.0)).sum(-1)


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {"fkl": _fkl, "skl": _skl, "tvd": _tvd}


def estimator(name: str, params: dict) -> Callable[[torch.Tensor, Sampled], torch.Tensor] | None:
    """The unbiased estimate of divergence ``name`` (with its loss parameters ``params``) from
    a :class:`Sampled` target, per position ``[...]``; None where there is none."""
    fn = ESTIMATORS.get(name)
    if fn is None:
        return None
    from kdexp.losses.bound import parameters

    defaults = parameters(name)
    own = {k: params.get(k, defaults[k]) for k in defaults if k != "chunk_size"}

    def estimate(student_logits: torch.Tensor, target: Sampled) -> torch.Tensor:
        covered = target.weights.sum(-1) > 0  # prompt and padding positions hold no draws
        if bool(covered.all()):
            return fn(student_logits, target, **own)
        values = fn(student_logits[covered], target[covered], **own)
        return values.new_zeros(covered.shape).masked_scatter(covered, values)

    return estimate


def problems(names: list[str]) -> list[str]:
    """One line for each divergence of the objective that sampled teacher targets cannot serve."""
    bad = [n for n in dict.fromkeys(names) if n not in SUPPORTED]
    if not bad:
        return []
    return [f"teacher.sparse=sampled estimates {', '.join(SUPPORTED)} without bias; loss={', '.join(bad)} "
            f"has no such estimate here (weights q/p of unbounded variance, a sort or normalization over the "
            f"vocabulary, or a form not implemented): use loss=fkl, skl or tvd, or teacher.sparse=topk, or "
            f"teacher.source=live"]


__all__ = ["ESTIMATORS", "SUPPORTED", "Sampled", "draw", "draw_seed", "draw_sequence", "estimator", "problems"]
