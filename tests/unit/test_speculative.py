"""Speculative sampling is exact: its outputs are distributed as the target's own.

On bigram models (``TableLM`` of test_analyze: the next token's logits are a row of a table
picked by the current token) the probability of every complete response is a product of table
entries, so the sampler's output frequencies are checked against the exact distribution with
a chi-square test, and a sampler with one deliberate error must fail the same test.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdexp import speculative as sp
from tests.unit.test_analyze import TableLM

EOS = 3


def probs(rows: list[list[float]]) -> torch.Tensor:
    """A bigram table of logits from probability rows over tokens 0..3 (3 = EOS; its own row is
    never used)."""
    p = torch.tensor(rows + [rows[0]], dtype=torch.float64)
    return p.log()


# EOS is reachable, so responses have different lengths.
TARGET = probs([[0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.3, 0.1], [0.35, 0.2, 0.25, 0.2]])
DRAFT = probs([[0.2, 0.5, 0.2, 0.1], [0.4, 0.2, 0.3, 0.1], [0.1, 0.1, 0.2, 0.6]])


def outcomes(table: torch.Tensor, start: int, max_new: int, temperature: float = 1.0) -> dict[tuple, float]:
    """Every response of at most ``max_new`` tokens (ending at EOS or at the budget) and its
    exact probability under the chain ``softmax(table / T)``."""
    p = (table / temperature).softmax(-1)
    out: dict[tuple, float] = {}

    def walk(prefix: tuple, last: int, prob: float) -> None:
        if (prefix and prefix[-1] == EOS) or len(prefix) == max_new:
            out[prefix] = prob
            return
        for y in range(p.shape[1]):
            walk((*prefix, y), y, prob * float(p[last, y]))

    walk((), start, 1.0)
    return out


def chi_square_p(counts: dict[tuple, int], exact: dict[tuple, float], n: int) -> float:
    """The p-value of Pearson's chi-square test of ``counts`` against ``exact``; the outcomes
    expected fewer than 5 times are pooled into one cell, where the test's approximation holds."""
    assert set(counts) <= set(exact)
    small = [k for k, p in exact.items() if n * p < 5]
    cells = [(counts.get(k, 0), n * p) for k, p in exact.items() if n * p >= 5]
    cells.append((sum(counts.get(k, 0) for k in small), n * sum(exact[k] for k in small)))
    stat = sum((c - e) ** 2 / e for c, e in cells if e > 0)
    df = sum(e > 0 for _, e in cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def frequencies(draft, target, n: int, gamma: int, max_new: int, seed: int, temperature: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    counts: dict[tuple, int] = {}
    for _ in range(n):
        out = sp.speculative_sample(draft, target, [0], gamma, max_new, [EOS], g, temperature)
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
    return counts


@pytest.mark.parametrize(("gamma", "temperature"), [(1, 1.0), (3, 1.0), (2, 0.7)])
def test_speculative_outputs_are_distributed_as_the_target(gamma, temperature):
    n, max_new = 3000, 4
    counts = frequencies(TableLM(DRAFT), TableLM(TARGET), n, gamma, max_new, seed=gamma, temperature=temperature)
    exact = outcomes(TARGET, 0, max_new, temperature)
    assert len(exact) == 3 ** 3 * 4 + sum(3 ** i for i in range(3))  # EOS or the budget ends each
    # Seeded: the same draws every time; a correct sampler passes at any ordinary level.
    assert chi_square_p(counts, exact, n) > 1e-3
    # ... and they are not the draft's.
    assert chi_square_p(counts, outcomes(DRAFT, 0, max_new, temperature), n) < 1e-6


def test_the_test_catches_a_sampler_without_the_residual(monkeypatch):
    """Replacing a rejected proposal with a fresh draw from p (instead of norm(max(0, p - q)))
    over-weights what the draft already proposes too often: the chi-square test must see it."""
    monkeypatch.setattr(sp, "residual", lambda log_p, log_q: log_p.exp())
    n, max_new = 3000, 4
    counts = frequencies(TableLM(DRAFT), TableLM(TARGET), n, 3, max_new, seed=3)
    assert chi_square_p(counts, outcomes(TARGET, 0, max_new), n) < 1e-6


def test_greedy_speculative_decoding_is_the_targets_greedy_output():
    g = torch.Generator().manual_seed(0)
    out = sp.speculative_sample(TableLM(DRAFT), TableLM(TARGET), [1], 3, 6, [], g, temperature=0.0)
    # The target's greedy chain from 1: 1 -> 1 -> 1 ...
    assert out.tokens == [1] * 6
    out = sp.speculative_sample(TableLM(DRAFT), TableLM(TARGET), [2], 3, 6, [], g, temperature=0.0)
    assert out.tokens == [0, 0, 0, 0, 0, 0]  # 2 -> 0, then 0 -> 0


def test_counts_and_the_targets_rows():
    g = torch.Generator().manual_seed(1)
    target = TableLM(TARGET)
    for gamma in (0, 1, 4):
        for _ in range(20):
            out = sp.speculative_sample(TableLM(DRAFT), target, [0], gamma, 7, [EOS], g)
            assert 1 <= len(out.tokens) <= 7
            assert EOS not in out.tokens[:-1]
            assert out.proposed == out.accepted + len(out.rejected) == len(out.alpha)
            assert out.draft_calls >= out.proposed  # those after a rejection are drafted, never verified
            assert len(out.tokens) <= out.target_calls * (gamma + 1)
            assert out.target_calls >= math.ceil(len(out.tokens) / (gamma + 1))
            assert all(0 <= i < len(out.tokens) for i in out.rejected)
            # The stored rows are the target's log-probabilities at each token's prefix.
            prev = [0, *out.tokens[:-1]]
            assert torch.allclose(out.target_logp, TARGET[prev].float().log_softmax(-1), atol=1e-6)
            assert all(0 <= a <= 1 + 1e-6 for a in out.alpha)
    out = sp.speculative_sample(TableLM(DRAFT), target, [0], 0, 5, [], g)  # gamma 0: plain sampling
    assert out.target_calls == 5 and out.proposed == 0


def test_a_draft_equal_to_the_target_is_always_accepted():
    g = torch.Generator().manual_seed(2)
    target = TableLM(TARGET)
    out = sp.speculative_sample(TableLM(TARGET), target, [0], 4, 10, [], g)
    assert out.accepted == out.proposed == 8 and not out.rejected
    assert out.target_calls == 2  # 5 tokens per call: 4 kept proposals and the target's own
    assert out.alpha == pytest.approx([1.0] * 8)


def test_alpha_is_one_minus_the_total_variation():
    p = torch.tensor([0.5, 0.3, 0.2]).log()
    q = torch.tensor([0.2, 0.3, 0.5]).log()
    assert float(torch.minimum(p, q).exp().sum()) == pytest.approx(1 - 0.5 * (0.3 + 0 + 0.3))
    r = sp.residual(p, q)
    assert r.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert sp.residual(p, p).tolist() == pytest.approx(p.exp().tolist())
    assert sp.policy(torch.tensor([1.0, 3.0, 2.0]), 0.0).exp().tolist() == [0.0, 1.0, 0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        sp.speculative_sample(TableLM(DRAFT), TableLM(TARGET), [0], -1, 5, [], torch.Generator())



def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A random model of a bundled config (a real Hugging Face model with a KV cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdexp.models import ASSETS

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / name)).eval()


@pytest.mark.parametrize("name", ["tiny-student", "tiny-moe"])
@torch.no_grad()
def test_the_cache_gives_the_full_forwards_logits_through_rollbacks(name):
    """Calls on a sequence that grows and loses its last tokens (rejected proposals), as
    speculative decoding makes them: the logits of a full forward pass each time, at a fraction
    of the tokens read."""
    import random

    model, rng = tiny(name), random.Random(0)
    ctx = sp.Context(model)
    ids, full = [rng.randrange(100) for _ in range(5)], 0
    for _ in range(30):
        n = rng.randint(1, 4)
        got = ctx.last_logits(ids, n)
        torch.testing.assert_close(got, model(input_ids=torch.tensor([ids])).logits[0, -n:], atol=1e-5, rtol=0)
        full += len(ids)
        ids = ids[: len(ids) - rng.randint(0, 2)] + [rng.randrange(100) for _ in range(rng.randint(1, 3))]
    assert ctx.read < full / 4
    # a cache that cannot be cropped (a sliding window, a recurrent state): read anew, still exact
    ctx.cache.layers[0].__class__ = type("DynamicSlidingWindowLayer", (type(ctx.cache.layers[0]),), {})
    shorter, before = ctx.tokens[:-2], ctx.read
    torch.testing.assert_close(ctx.last_logits(shorter, 1), model(input_ids=torch.tensor([shorter])).logits[0, -1:],
                               atol=1e-5, rtol=0)
    assert ctx.read - before == len(shorter) and ctx.tokens == shorter


def test_speculative_decoding_with_the_cache_is_decoding_without_it(monkeypatch):
    """The same draws give the same response, counts and target rows whether each call reads
    the whole sequence or only what its cache lacks."""

    class Full(sp.Context):
        def last_logits(self, ids, n):
            logits = self.model(input_ids=torch.tensor([list(ids)])).logits[0, -n:]
            return logits[:, : self.vocab] if self.vocab else logits

    draft, target = tiny("tiny-student", 1), tiny("tiny-teacher", 2)

    def decode():
        g = torch.Generator().manual_seed(5)
        return [sp.speculative_sample(draft, target, [1, 7, 9], 3, 24, [0], g, temperature=1.0) for _ in range(4)]

    cached = decode()
    monkeypatch.setattr(sp, "Context", Full)
    full = decode()
    for a, b in zip(cached, full, strict=True):
        assert a.tokens == b.tokens and (a.proposed, a.accepted, a.rejected) == (b.proposed, b.accepted, b.rejected)
        torch.testing.assert_close(a.target_logp, b.target_logp, atol=1e-5, rtol=0)
    assert sum(o.proposed for o in cached) > 10 and sum(len(o.rejected) for o in cached) > 0  # rollbacks happened
