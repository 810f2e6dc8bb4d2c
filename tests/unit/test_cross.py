"""Divergences across tokenizers (kdexp.losses.cross) against independent formulas."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdexp.losses import divergence
from kdexp.losses.cross import hybrid, matched_ids, merged_rows, sorted_l1, uld


def test_sorted_l1_by_hand_and_padding():
    p = torch.tensor([0.1, 0.6, 0.3])
    q = torch.tensor([0.5, 0.5])
    # sorted: [.6, .3, .1] vs [.5, .5, 0]
    assert sorted_l1(p, q).item() == pytest.approx(0.1 + 0.2 + 0.1)
    assert sorted_l1(q, p).item() == pytest.approx(0.4)


def test_uld_against_a_loop_and_its_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 11)
    got = uld(s, t, temperature=2.0)
    for n in range(5):
        a = sorted((s[n] / 2).softmax(-1).tolist(), reverse=True) + [0.0] * 4
        b = sorted((t[n] / 2).softmax(-1).tolist(), reverse=True)
        assert got[n].item() == pytest.approx(sum(abs(x - y) for x, y in zip(a, b, strict=True)), abs=1e-6)
    perm = torch.randperm(11)
    torch.testing.assert_close(uld(s, t[:, perm]), uld(s, t))  # blind to which token is which
    assert uld(t, t).abs().max() < 1e-7 and (got > 0).all()


def test_uld_gradients_by_gradcheck():
    torch.manual_seed(1)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 9, dtype=torch.float64)
    # uld computes in float32; check the float64 formula that it is
    fn = lambda x: sorted_l1(x.softmax(-1), t.softmax(-1))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


def test_merged_rows_are_the_chain_rule():
    torch.manual_seed(2)
    logp = torch.randn(5, 4).log_softmax(-1)
    ids = [1, 3, 0, 2, 2]
    rows = merged_rows(logp, ids, [range(0, 1), range(1, 4), range(4, 5)])
    torch.testing.assert_close(rows[0], logp[0])
    torch.testing.assert_close(rows[1], logp[3] + logp[1, 3] + logp[2, 0])
    torch.testing.assert_close(rows[2], logp[4])
    # a span's row sums to the probability of its earlier tokens
    assert rows[1].exp().sum().item() == pytest.approx((logp[1, 3] + logp[2, 0]).exp().item(), rel=1e-5)


def test_matched_ids_pair_the_same_strings():
    s, t = matched_ids({"a": 0, "b": 1, "c": 2}, {"c": 5, "a": 7, "z": 1})
    assert (s, t) == ([0, 2], [7, 5])


def test_hybrid_with_the_same_vocabulary_is_jsd_on_every_token():
    """Every token matched: the rest bucket is empty, the sorted part has nothing to compare,
    and w = 1: the hybrid is the ordinary jsd divergence of the same distributions."""
    torch.manual_seed(3)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    for beta in (0.0, 0.3, 1.0):
        got = hybrid(s.log_softmax(-1), t.log_softmax(-1), range(6), range(6), beta=beta)
        torch.testing.assert_close(got, divergence("jsd", beta=beta)(s, t), atol=1e-5, rtol=1e-4)


def test_hybrid_by_hand_with_one_unmatched_token_per_side():
    # student vocab [x, y, s_only], teacher vocab [t_only, y, x]; x and y matched
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.1, 0.3, 0.6]])
    got = hybrid(p.log(), q.log(), [0, 1], [2, 1], beta=0.0, matched_weight=0.25)
    coarse_p, coarse_q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.3, 0.1])  # x, y, rest
    fkl = (coarse_q * (coarse_q / coarse_p).log()).sum()  # beta 0: KL(teacher || student)
    assert got.item() == pytest.approx(0.25 * fkl.item() + 0.75 * abs(0.2 - 0.1), rel=1e-5)


def test_hybrid_is_zero_where_the_rows_agree_and_positive_elsewhere():
    torch.manual_seed(4)
    t = torch.randn(3, 5).log_softmax(-1)
    s = t[:, [2, 0, 1, 3, 4]]  # the same distribution, tokens in another order
    ms, mt = [1, 2, 0, 3, 4], [0, 1, 2, 3, 4]  # student id -> teacher id of the same string
    assert hybrid(s, t, ms, mt).abs().max() < 1e-6
    for w in (0.0, 0.5, 1.0):
        assert (hybrid(torch.randn(3, 5).log_softmax(-1), t, ms[:3], mt[:3], matched_weight=w) > 0).all()


def test_hybrid_gradients_by_gradcheck():
    torch.manual_seed(5)
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, dtype=torch.float64).log_softmax(-1)
    for beta, w in itertools.product((0.0, 0.5), (0.4,)):
        assert torch.autograd.gradcheck(
            lambda x, beta=beta, w=w: hybrid(x.log_softmax(-1), t, [0, 2], [1, 3], beta=beta, matched_weight=w), (s,))


def test_the_earlier_tokens_of_a_span_count_in_the_matched_part():
    """Same last-token distributions, different probabilities of the span's earlier tokens: the
    matched part sees them (outcomes "earlier tokens, then token i" plus a rest bucket), and the
    student's earlier tokens get a gradient from it."""
    last = torch.tensor([[0.5, 0.3, 0.2]]).log()
    prefix_s = torch.tensor([0.5]).log().requires_grad_()
    prefix_t = torch.tensor([0.9]).log()
    got = hybrid(last, last, [0, 1], [0, 1], beta=0.0, matched_weight=1.0, prefix_s=prefix_s, prefix_t=prefix_t)
    # by hand: outcomes (x, y, rest) = (P a, P b, 1 - P (a + b)) on each side; beta 0 is KL(teacher || student)
    s = torch.tensor([0.5 * 0.5, 0.5 * 0.3, 1 - 0.5 * 0.8])
    t = torch.tensor([0.9 * 0.5, 0.9 * 0.3, 1 - 0.9 * 0.8])
    assert got.item() == pytest.approx((t * (t / s).log()).sum().item(), rel=1e-5)
    got.sum().backward()
    assert prefix_s.grad.abs().item() > 0.1


def test_the_rest_bucket_is_exact_when_it_is_tiny():
    from kdexp.losses.cross import _coarse

    for rest in (1e-5, 1e-9, 1e-20):
        last = torch.tensor([[0.6 - rest, 0.4, rest]], dtype=torch.float64).log().float()
        out = _coarse(last, torch.zeros(1), torch.tensor([0, 1]), torch.tensor([False, False, True]))
        assert out[0, 2].exp().item() == pytest.approx(rest, rel=1e-4)
        assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_spans_whose_last_tokens_continue_other_text_are_compared_sorted_only():
    """" word" as one student token against " ", "word": the teacher's "word" is not the student's
    "word" (which has no space before it), so a row marked not direct takes the sorted comparison
    of every token's chain-rule probability, whatever the matched weight."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]).log()
    q = torch.tensor([[0.1, 0.3, 0.6], [0.1, 0.3, 0.6]]).log()
    got = hybrid(p, q, [0, 1], [2, 1], beta=0.0, matched_weight=0.25, direct=torch.tensor([1.0, 0.0]),
                 prefix_t=torch.tensor([1.0, 0.5]).log())
    assert got[1].item() == pytest.approx(sorted_l1(p[1].exp(), 0.5 * q[1].exp()).item(), rel=1e-5)
    alone = hybrid(p[:1], q[:1], [0, 1], [2, 1], beta=0.0, matched_weight=0.25)
    assert got[0].item() == pytest.approx(alone.item(), rel=1e-6)


@pytest.mark.parametrize("direct_a", [1.0, 0.0])
def test_span_positions_read_each_spans_rows_and_prefixes_at_their_positions(direct_a):
    """A hand-built batch: the student's response tokens 0, 1 form one span against the teacher's
    tokens 0, 1 (token 0 is the span's earlier token on each side), then one token each. The
    loss sits at the student position predicting each span's last token and equals the hybrid of
    the rows and prefixes read by hand (each earlier token's log-probability on its side);
    ``direct`` = 0 leaves the span to the sorted comparison."""
    from kdexp import losses
    from kdexp.losses.cross import span_positions
    from kdexp.losses.objective import IGNORE_INDEX as IGN

    g = torch.Generator().manual_seed(7)
    s_logits, t_logits = torch.randn(1, 5, 6, generator=g), torch.randn(1, 5, 7, generator=g)
    resp_s, resp_t = [2, 4, 1], [3, 5, 6]
    batch = {"targets": torch.tensor([[IGN, *resp_s, IGN]]), "x_targets": torch.tensor([[IGN, *resp_t, IGN]]),
             "x_pos": torch.tensor([[-1, -1, 2, 3, -1]]), "x_first_s": torch.tensor([[0, 0, 1, 3, 0]]),
             "x_first_t": torch.tensor([[0, 0, 1, 3, 0]]), "x_direct": torch.tensor([[0.0, 0.0, direct_a, 1.0, 0.0]]),
             "x_matched_s": torch.tensor([2, 4, 1, 0]), "x_matched_t": torch.tensor([3, 5, 1, 6])}
    T = 2.0
    div = losses.divergence("fkl", temperature=1.0)
    got = span_positions(s_logits, t_logits, batch, div, T, matched_weight=0.6)
    log_s, log_t = (s_logits[0] / T).log_softmax(-1), (t_logits[0] / T).log_softmax(-1)
    last_s, last_t = log_s[[2, 3]], log_t[[2, 3]]
    prefix_s = torch.stack([log_s[1, resp_s[0]], torch.tensor(0.0)])  # span A's earlier token; span B has none
    prefix_t = torch.stack([log_t[1, resp_t[0]], torch.tensor(0.0)])
    want = hybrid(last_s, last_t, [2, 4, 1, 0], [3, 5, 1, 6], matched_weight=0.6, divergence=div,
                  prefix_s=prefix_s, prefix_t=prefix_t, direct=torch.tensor([direct_a, 1.0]))
    torch.testing.assert_close(got[0, [2, 3]], want)
    assert torch.all(got[0, [0, 1, 4]] == 0)
    # the chain rule of merged_rows is the same prefix
    torch.testing.assert_close(merged_rows(log_s[1:4], resp_s, [range(0, 2), range(2, 3)]),
                               last_s + prefix_s[:, None])
