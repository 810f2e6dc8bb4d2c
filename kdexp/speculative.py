"""Speculative sampling: a draft model proposes, the target verifies, and the output is an exact
sample of the target.

    from kdexp.speculative import speculative_sample
    out = speculative_sample(draft, target, prompt_ids, gamma=4, max_new_tokens=96, stop_ids=[eos],
                             generator=torch.Generator().manual_seed(0))
    out.tokens, out.accepted / out.proposed, len(out.tokens) / out.target_calls

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML
2023, Algorithm 1) and Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling" (arXiv 2302.01318, 2023, Algorithm 2). Each round the draft q samples up
to ``gamma`` tokens; one call of the target p scores all of them; the i-th is kept with
probability ``min(1, p(x)/q(x))``; the first rejected one is replaced by a draw from
``norm(max(0, p - q))`` and the round ends; if all are kept, the target's distribution after
them gives one more token. Every token of the output is then distributed as the target's own
(at the same temperature), whatever the draft, the number of proposals per round, or where
the output stops.

Each model keeps a KV cache of the sequence it has read (:class:`Context`): a call reads only
the tokens past the longest prefix still valid, and after a rejection the cache is cropped back
to the accepted tokens rather than recomputed. With ``temperature=0`` both sides are greedy (their
argmax as a one-hot distribution), and the output is the target's greedy output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kdexp.rollout import cache_key


@dataclass
class SpeculativeOutput:
    """One response decoded speculatively, and what it cost.

    ``tokens``: the response (its stop token included, if it stopped); ``target_calls`` /
    ``draft_calls``: forward passes of each model; ``proposed`` / ``accepted``: draft tokens
    verified / kept; ``alpha``: ``sum_x min(p(x), q(x))`` at each verified proposal (the
    expected acceptance of that proposal: Leviathan et al., Sec. 3); ``rejected``: indices into
    ``tokens`` of the target's replacements of rejected proposals; ``target_logp``: the target's
    log-probabilities at temperature 1 where it produced or verified each token ``[len(tokens), V]``
    (they come free with verification, and are what online distillation learns from).
    """

    tokens: list[int] = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    alpha: list[float] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    target_logp: torch.Tensor | None = None


def policy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of the sampling distribution: ``log_softmax(logits / T)`` in float32, or
    the argmax as a one-hot (0 / -inf) when ``T == 0``. [..., V] -> [..., V]"""
    logits = logits.float()
    if temperature > 0:
        return torch.log_softmax(logits / temperature, -1)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)


def residual(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))``: what a rejected proposal is replaced with. [V] x2 -> [V] probabilities.

    Where ``p <= q`` everywhere (in float32, only when p and q are equal, and rejection then has
    probability 0), p itself."""
    r = (log_p.exp() - log_q.exp()).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else log_p.exp()


def _croppable(cache) -> bool:
    """Whether the tokens past a point can be removed from ``cache`` exactly: full-attention
    layers only (a sliding window or a linear-attention state has lost what a crop would need)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: the plain DynamicCache
        return type(cache).__name__ == "DynamicCache"
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class Context:
    """One model's forward passes over one growing sequence, with a KV cache.

    ``last_logits(ids, n)`` gives the logits at the last ``n`` positions of ``ids``. The cache
    holds the tokens read so far; a call keeps the longest prefix they share with ``ids`` (up
    to ``len(ids) - n``, so the ``n`` positions asked for are read anew), crops the rest
    (``Cache.crop``: the proposals after a rejected one) and reads the remainder. A model that
    returns no cache, or one that cannot be cropped, reads the whole sequence again instead.
    """

    def __init__(self, model: torch.nn.Module, vocab: int | None = None):
        self.model, self.vocab = model, vocab
        self.device = next(model.parameters()).device
        self.cache_key = cache_key(model)
        self.cache = None
        self.tokens: list[int] = []  # what the cache holds
        self.read = 0  # tokens read, over every call (the work a cache saves)

    def last_logits(self, ids: Sequence[int], n: int) -> torch.Tensor:
        """-> [n, V] (the leading ``vocab`` columns)"""
        keep, limit = 0, min(len(self.tokens), len(ids) - n)
        while keep < limit and self.tokens[keep] == ids[keep]:
            keep += 1
        if keep < len(self.tokens):
            if keep > 0 and _croppable(self.cache):
                self.cache.crop(keep - len(self.tokens))  # negative: remove that many (transformers 4 and 5)
            else:
                self.cache, keep = None, 0
        out = self.model(input_ids=torch.tensor([list(ids[keep:])], device=self.device), use_cache=True,
                         **{self.cache_key: self.cache})
        self.read += len(ids) - keep
        self.cache = getattr(out, self.cache_key, None)
        self.tokens = list(ids) if self.cache is not None else []
        logits = out.logits[0, -n:]
        return logits[:, : self.vocab] if self.vocab else logits


@torch.no_grad()
def speculative_sample(draft: torch.nn.Module, target: torch.nn.Module, prompt: Sequence[int], gamma: int,
                       max_new_tokens: int, stop_ids: Sequence[int], generator: torch.Generator,
                       temperature: float = 1.0, vocab: int | None = None) -> SpeculativeOutput:
    """One response to ``prompt`` from ``target``, drafted ``gamma`` tokens at a time by ``draft``.

    Both models are plain causal LMs in eval mode sharing a tokenizer; ``vocab``: the leading
    logit columns both define (``None``: all). The response stops after a token of
    ``stop_ids`` or at ``max_new_tokens``; a round proposes at most what fits, so no call is
    wasted past the budget, and the draft stops proposing after a stop token.
    """
    if gamma < 0 or max_new_tokens < 0:
        raise ValueError(f"gamma and max_new_tokens must be >= 0, got {gamma} and {max_new_tokens}")
    stops, out, rows = set(stop_ids), SpeculativeOutput(), []
    ids = list(prompt)
    draft_ctx, target_ctx = Context(draft, vocab), Context(target, vocab)
    while len(out.tokens) < max_new_tokens and not (out.tokens and out.tokens[-1] in stops):
        k = min(gamma, max_new_tokens - len(out.tokens) - 1)
        drafts: list[int] = []
        draft_logq = []
        for _ in range(k):
            log_q = policy(draft_ctx.last_logits(ids + drafts, 1)[0], temperature)  # [V]
            out.draft_calls += 1
            x = int(torch.multinomial(log_q.exp().cpu(), 1, generator=generator))
            drafts.append(x)
            draft_logq.append(log_q)
            if x in stops:
                break
        logits = target_ctx.last_logits(ids + drafts, len(drafts) + 1)  # [len(drafts) + 1, V]
        out.target_calls += 1
        log_p = policy(logits, temperature)
        raw = torch.log_softmax(logits.float(), -1)
        new: list[int] = []
        for i, (x, log_q) in enumerate(zip(drafts, draft_logq, strict=True)):
            out.proposed += 1
            out.alpha.append(float(torch.minimum(log_p[i], log_q).exp().sum()))
            u = float(torch.rand((), generator=generator))
            if u < float((log_p[i, x] - log_q[x]).exp().clamp(max=1)):
                out.accepted += 1
                new.append(x)
                continue
            y = int(torch.multinomial(residual(log_p[i], log_q).cpu(), 1, generator=generator))
            out.rejected.append(len(out.tokens) + len(new))
            new.append(y)
            break
        else:
            if not (drafts and drafts[-1] in stops):  # every proposal kept: the target's next token
                new.append(int(torch.multinomial(log_p[len(drafts)].exp().cpu(), 1, generator=generator)))
        rows.append(raw[: len(new)])
        out.tokens += new
        ids += new
    out.target_logp = torch.cat(rows) if rows else torch.empty(0, 0)
    return out


__all__ = ["Context", "SpeculativeOutput", "policy", "residual", "speculative_sample"]
