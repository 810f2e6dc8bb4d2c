"""kdexp.evaluation.analysis: each analysis against closed forms, brute-force loops and properties."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from kdexp.evaluation.analysis import (
    CalibrationAccumulator,
    DifficultyAccumulator,
    acceptance_rate,
    difficulty_buckets,
    distinct_n,
    ece,
    exposure_metrics,
    kl_per_position,
    per_position_mean,
    per_step_mean,
    self_bleu,
    sentence_bleu,
    top1_agreement,
)

NEG_INF = float("-inf")


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(t: np.ndarray, s: np.ndarray) -> float:
    p, q = _np_softmax(t.astype(np.float64)), _np_softmax(s.astype(np.float64))
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))


# --------------------------------------------------------------------------------- identical models

def test_student_identical_to_teacher():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    kl = kl_per_position(logits, logits.clone(), mask)
    assert kl.shape == (3, 5) and kl.dtype == torch.float32
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    assert top1_agreement(logits, logits.clone(), mask) == 100.0
    assert torch.allclose(acceptance_rate(logits, logits.clone()), torch.ones(3, 5), atol=1e-6)
    eps, count = per_step_mean(kl, mask)
    assert count.tolist() == [3, 3, 3, 2, 2]
    assert torch.allclose(eps, torch.zeros(5, dtype=torch.float64), atol=1e-6)
    out = exposure_metrics([0.0] * 4, [0.0] * 4)
    assert out["eps"] == [0.0] * 4 and out["R"] == [0.0] * 4
    assert all(math.isnan(v) for v in out["AccErr"] + out["ExAccErr"])  # 0 / 0: nan, not a crash
    buckets = difficulty_buckets(logits[0], logits[0].clone(), torch.randint(0, 11, (5,)))
    filled = [i for i, c in enumerate(buckets["count"]) if c]
    assert all(buckets["top1_agreement"][i] == 100.0 for i in filled)
    assert all(abs(buckets["kl"][i]) < 1e-6 for i in filled)


# --------------------------------------------------------------------------------- KL and agreement

def test_kl_closed_form_bernoulli():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    # Logits are log-probabilities up to a constant: shifting either changes nothing.
    got = kl_per_position(q.log()[None, None] + 7.0, p.log()[None, None] - 3.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kl_one_hot_teacher_is_student_nll():
    # p = delta at k (other logits -inf): KL(p || q) = -log q_k.
    student = torch.tensor([[[1.0, 2.0, -0.5, 0.3]]])
    teacher = torch.full((1, 1, 4), NEG_INF)
    teacher[..., 2] = 0.0
    expected = -torch.log_softmax(student, -1)[..., 2]
    assert torch.allclose(kl_per_position(student, teacher), expected, atol=1e-6)
    assert torch.isfinite(kl_per_position(student, teacher)).all()


def test_kl_matches_numpy_loop_with_mask_on_odd_shape():
    torch.manual_seed(1)
    s, t = torch.randn(3, 7, 13) * 2, torch.randn(3, 7, 13) * 2
    mask = torch.rand(3, 7) > 0.3
    got = kl_per_position(s, t, mask)
    for b in range(3):
        for i in range(7):
            ref = _np_kl(t[b, i].numpy(), s[b, i].numpy()) if mask[b, i] else 0.0
            assert got[b, i].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # bf16 inputs are upcast: float32 out, close to the float32 computation on the same values.
    got16 = kl_per_position(s.bfloat16(), t.bfloat16(), mask)
    assert got16.dtype == torch.float32
    assert torch.allclose(got16, kl_per_position(s.bfloat16().float(), t.bfloat16().float(), mask))


def test_top1_agreement_counts_only_valid_positions():
    # argmax teacher: 0, 1, 2, 0 ; argmax student: 0, 2, 2, 1
    teacher = torch.tensor([[[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]]])
    student = torch.tensor([[[3.0, 1, 0], [0, 1, 2], [0, 0, 1], [0, 9, 0]]])
    assert top1_agreement(student, teacher) == pytest.approx(50.0)
    assert top1_agreement(student, teacher, torch.tensor([[True, False, True, False]])) == 100.0
    assert top1_agreement(student, teacher, torch.tensor([[False, True, False, True]])) == 0.0
    assert math.isnan(top1_agreement(student, teacher, torch.zeros(1, 4, dtype=torch.bool)))


# --------------------------------------------------------------------------------- per-position curves

def test_per_position_mean_and_stderr_match_numpy_on_ragged_batch():
    gen = torch.Generator().manual_seed(2)
    values = torch.rand(6, 5, generator=gen)
    lengths = [5, 5, 4, 2, 1, 3]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    values[~mask] = float("nan")  # padding content must not leak into the statistics
    mean, stderr, count = per_position_mean(values, mask)
    for t in range(5):
        col = np.array([values[b, t].item() for b in range(6) if mask[b, t]])
        assert count[t].item() == len(col)
        assert mean[t].item() == pytest.approx(col.mean())
        if len(col) > 1:
            assert stderr[t].item() == pytest.approx(col.std(ddof=1) / math.sqrt(len(col)))
        else:
            assert math.isnan(stderr[t].item())
    # A position no sequence reaches: count 0, nan mean.
    mean, stderr, count = per_position_mean(torch.ones(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    assert count.tolist() == [2, 1, 0] and math.isnan(mean[2].item()) and math.isnan(stderr[1].item())


# --------------------------------------------------------------------------------- exposure bias

def test_exposure_metrics_match_brute_force():
    rng = random.Random(3)
    eps_t = [rng.uniform(0.1, 1.0) for _ in range(9)]
    regret_t = [rng.uniform(0.1, 3.0) for _ in range(9)]
    out = exposure_metrics(eps_t, torch.tensor(regret_t, dtype=torch.float64))
    assert out["l"] == list(range(1, 10))
    for i, length in enumerate(out["l"]):
        r = sum(regret_t[:length])
        e = sum(eps_t[:length]) / length
        assert out["R"][i] == pytest.approx(r)
        assert out["eps"][i] == pytest.approx(e)
        assert out["AccErr"][i] == pytest.approx(r / e)
        assert out["ExAccErr"][i] == pytest.approx((r - length * e) / (length * e) * 100)


def test_exposure_metrics_closed_forms():
    eps_t = [0.5, 0.2, 0.9, 0.4]
    # No exposure bias (same error on own prefixes): AccErr(l) = l, ExAccErr = 0.
    same = exposure_metrics(eps_t, eps_t)
    assert same["AccErr"] == pytest.approx([1, 2, 3, 4])
    assert same["ExAccErr"] == pytest.approx([0, 0, 0, 0], abs=1e-9)
    # Twice the error on own prefixes: 100 % excess at every length.
    assert exposure_metrics(eps_t, [2 * e for e in eps_t])["ExAccErr"] == pytest.approx([100.0] * 4)
    # eps(l) = 0 only for a leading run of zeros: nan there, finite afterwards.
    out = exposure_metrics([0.0, 0.0, 0.3], [0.1, 0.1, 0.1])
    assert math.isnan(out["AccErr"][0]) and math.isnan(out["ExAccErr"][1])
    assert out["AccErr"][2] == pytest.approx(0.3 / 0.1)
    with pytest.raises(ValueError):
        exposure_metrics([0.1, 0.2], [0.1])


# --------------------------------------------------------------------------------- token difficulty

def _difficulty_reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    rows: list[list[tuple[float, float, float, float]]] = [[] for _ in range(n)]
    for i in range(len(y)):
        p = _np_softmax(t[i].double().numpy())
        unc = 1.0 - p[y[i]]
        b = n - 1 if unc >= 1.0 else int(math.floor(unc * n))
        logits = s[i].double().numpy()
        std = math.sqrt(sum((x - logits.mean()) ** 2 for x in logits) / len(logits))
        agree = 100.0 * (int(np.argmax(logits)) == int(np.argmax(t[i].numpy())))
        rows[b].append((unc, std, _np_kl(t[i].numpy(), s[i].numpy()), agree))
    return {"count": [len(r) for r in rows],
            "cols": [[float(np.mean([row[k] for row in r])) if r else float("nan") for r in rows]
                     for k in range(4)]}


def test_difficulty_buckets_match_brute_force():
    torch.manual_seed(4)
    n_pos, vocab = 400, 9
    t = torch.randn(n_pos, vocab) * torch.rand(n_pos, 1) * 6  # spread of teacher confidences
    s = t + torch.randn(n_pos, vocab)
    y = torch.randint(0, vocab, (n_pos,))
    got = difficulty_buckets(s, t, y, n_buckets=10)
    ref = _difficulty_reference(s, t, y, 10)
    assert got["count"] == ref["count"] and sum(got["count"]) == n_pos
    assert got["edges"] == pytest.approx([i / 10 for i in range(11)])
    for key, col in zip(["unc", "student_logit_std", "kl", "top1_agreement"], ref["cols"], strict=True):
        assert got[key] == pytest.approx(col, rel=1e-4, abs=1e-5, nan_ok=True), key


def test_difficulty_bucket_edges_and_empty_buckets():
    # Exact UNC values: 0 (p[target] = 1), 0.5 (two equal logits), 1 (p[target] = 0).
    t = torch.tensor([[0.0, NEG_INF, NEG_INF], [0.0, 0.0, NEG_INF], [0.0, NEG_INF, NEG_INF]])
    y = torch.tensor([0, 1, 2])
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 0.0, -4.0]])
    got = difficulty_buckets(s, t, y, n_buckets=4)
    assert got["count"] == [1, 0, 1, 1]  # 0.5 opens bucket [0.5, 0.75); 1.0 is in the closed last one
    assert got["unc"][0] == 0.0 and got["unc"][2] == 0.5 and got["unc"][3] == 1.0
    assert math.isnan(got["unc"][1]) and math.isnan(got["kl"][1]) and math.isnan(got["top1_agreement"][1])
    assert got["student_logit_std"][0] == pytest.approx(math.sqrt(2 / 3))  # std of (1, 2, 3), ddof 0
    assert got["student_logit_std"][2] == 0.0
    assert got["student_logit_std"][3] == pytest.approx(math.sqrt(32 / 3))
    assert got["top1_agreement"] == pytest.approx([0.0, float("nan"), 100.0, 100.0], nan_ok=True)


def test_difficulty_accumulator_batches_and_mask():
    torch.manual_seed(5)
    s, t = torch.randn(4, 6, 10), torch.randn(4, 6, 10) * 3
    y = torch.randint(0, 10, (4, 6))
    mask = torch.rand(4, 6) > 0.25
    y_padded = y.masked_fill(~mask, -100)  # ignore index where masked: must never be gathered
    one = DifficultyAccumulator(5)
    one.add(s, t, y_padded, mask)
    two = DifficultyAccumulator(5)
    two.add(s[:1], t[:1], y_padded[:1], mask[:1])
    two.add(s[1:], t[1:], y_padded[1:], mask[1:])
    flat = difficulty_buckets(s[mask], t[mask], y[mask], n_buckets=5)
    a, b = one.result(), two.result()
    assert a["count"] == b["count"] == flat["count"]
    for key in ["unc", "student_logit_std", "kl", "top1_agreement"]:
        assert a[key] == pytest.approx(b[key], nan_ok=True)
        assert a[key] == pytest.approx(flat[key], nan_ok=True)


# --------------------------------------------------------------------------------- calibration

def test_ece_hand_computed():
    conf = torch.tensor([0.9, 0.8, 0.3, 0.35], dtype=torch.float64)
    correct = torch.tensor([True, False, False, True])
    out = ece(conf, correct, n_bins=2)
    # bin (0, .5]: conf .325, acc .5, gap .175; bin (.5, 1]: conf .85, acc .5, gap .35
    assert out["count"] == [2, 2] and out["n"] == 4
    assert out["confidence"] == pytest.approx([0.325, 0.85])
    assert out["accuracy"] == pytest.approx([0.5, 0.5])
    assert out["ece"] == pytest.approx(0.5 * 0.175 + 0.5 * 0.35)
    assert out["mce"] == pytest.approx(0.35)


def test_ece_bins_are_right_closed_and_empty_bins_are_nan():
    out = ece(torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64), torch.tensor([True, True, False]), n_bins=4)
    # (0, .25] gets .25; (.25, .5] gets .5; (.75, 1] gets 1.0; (.5, .75] is empty
    assert out["count"] == [1, 1, 0, 1]
    assert math.isnan(out["confidence"][2]) and math.isnan(out["accuracy"][2])
    assert out["ece"] == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert out["mce"] == pytest.approx(0.5)
    assert math.isnan(ece(torch.zeros(0), torch.zeros(0, dtype=torch.bool))["ece"])


def test_ece_extremes_and_synthetic_calibration():
    n = 200_000
    gen = torch.Generator().manual_seed(6)
    # All confident, all wrong: ECE = MCE = 1.
    wrong = ece(torch.ones(50), torch.zeros(50, dtype=torch.bool))
    assert wrong["ece"] == pytest.approx(1.0) and wrong["mce"] == pytest.approx(1.0)
    # Perfectly calibrated: P(correct | c) = c. Per-bin sampling error is ~ sqrt(.25 / (n / 15)) = .004.
    conf = torch.rand(n, generator=gen, dtype=torch.float64)
    calibrated = torch.rand(n, generator=gen, dtype=torch.float64) < conf
    assert ece(conf, calibrated)["ece"] < 0.01
    # Over-confident, P(correct | c) = c^2: each bin's gap is its mean of c - c^2, so ECE -> E[c - c^2] = 1/6.
    over = torch.rand(n, generator=gen, dtype=torch.float64) < conf**2
    assert ece(conf, over)["ece"] == pytest.approx(1 / 6, abs=0.01)


def test_calibration_accumulator_matches_ece_and_is_batch_invariant():
    torch.manual_seed(7)
    logits, y = torch.randn(3, 8, 6) * 2, torch.randint(0, 6, (3, 8))
    mask = torch.rand(3, 8) > 0.2
    one = CalibrationAccumulator(10)
    one.add(logits, y.masked_fill(~mask, -100), mask)
    two = CalibrationAccumulator(10)
    for b in range(3):
        two.add(logits[b], y[b], mask[b])
    probs = torch.softmax(logits[mask].double(), -1)
    ref = ece(probs.max(-1).values, probs.argmax(-1) == y[mask], n_bins=10)
    for out in (one.result(), two.result()):
        assert out["count"] == ref["count"]
        assert out["ece"] == pytest.approx(ref["ece"], abs=1e-6)
        assert out["accuracy"] == pytest.approx(ref["accuracy"], nan_ok=True)


# --------------------------------------------------------------------------------- speculative decoding

def test_acceptance_rate_closed_forms():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.3, 0.2, 0.4])
    assert acceptance_rate(q.log(), p.log()).item() == pytest.approx(0.1 + 0.3 + 0.2)
    disjoint = acceptance_rate(torch.tensor([0.0, 0.0, NEG_INF, NEG_INF]), torch.tensor([NEG_INF, NEG_INF, 0, 0]))
    assert disjoint.item() == 0.0
    torch.manual_seed(8)
    s, t = torch.randn(2, 3, 17) * 2, torch.randn(2, 3, 17) * 2
    tvd = 0.5 * (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().sum(-1)
    alpha = acceptance_rate(s, t)
    assert alpha.shape == (2, 3) and alpha.dtype == torch.float32
    assert torch.allclose(alpha, 1 - tvd, atol=1e-6)
    assert torch.allclose(alpha, acceptance_rate(t, s))  # symmetric in p and q


def test_acceptance_rate_monte_carlo():
    # Speculative sampling: draw x ~ q, accept with probability min(1, p(x) / q(x)).
    gen = torch.Generator().manual_seed(9)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.2, 0.2, 0.25, 0.25])
    n = 200_000
    x = torch.multinomial(q, n, replacement=True, generator=gen)
    accepted = torch.rand(n, generator=gen) < (p[x] / q[x]).clamp(max=1)
    alpha = acceptance_rate(q.log(), p.log()).item()
    assert alpha == pytest.approx(0.1 + 0.2 + 0.2 + 0.1)
    assert abs(accepted.double().mean().item() - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n)


# --------------------------------------------------------------------------------- diversity

def test_distinct_n():
    assert distinct_n(["a a a b"], 1) == 0.5
    assert distinct_n(["a a a b"], 2) == pytest.approx(2 / 3)  # (a a) x2, (a b)
    assert distinct_n(["A b", "a B"], 1) == 0.5  # lowercased
    assert distinct_n(["a b", "b a"], 2) == 1.0
    assert distinct_n(["a", "b"], 2) == 0.0  # no n-gram crosses a text boundary; none at all -> 0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def _bleu_reference(hyp: list[str], refs: list[list[str]], max_n: int = 4) -> float:
    """Plain product-of-precisions BLEU with add-one smoothing for n > 1, written from the definition."""
    if not hyp:
        return 0.0
    precisions = []
    for n in range(1, max_n + 1):
        grams = [tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1)]
        clipped = 0
        for g in set(grams):
            max_ref = max(sum(tuple(r[i:i + n]) == g for i in range(len(r) - n + 1)) for r in refs)
            clipped += min(grams.count(g), max_ref)
        num, den = (clipped, len(grams)) if n == 1 else (clipped + 1, len(grams) + 1)
        precisions.append(num / den)
    if precisions[0] == 0:
        return 0.0
    r = sorted((abs(len(ref) - len(hyp)), len(ref)) for ref in refs)[0][1]
    bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
    return 100 * bp * math.prod(precisions) ** (1 / max_n)


BLEU_CASES = [
    ("the cat sat on the mat", ["the cat is on the mat", "there is a cat on the mat"]),
    ("the the the the the the the", ["the cat is on the mat", "there is a cat on the mat"]),
    ("a cat on the mat", ["the cat sat on the mat today", "cat"]),  # brevity penalty, closest ref 6
    ("on the mat the cat sat quietly", ["the cat sat on the mat"]),
    ("x y z", ["x y z w v", "x"]),  # refs 2 shorter and 2 longer: the tie goes to the shorter (no BP)
]


@pytest.mark.parametrize("hyp, refs", BLEU_CASES)
def test_sentence_bleu_matches_reference(hyp, refs):
    h, rs = hyp.split(), [r.split() for r in refs]
    assert sentence_bleu(h, rs) == pytest.approx(_bleu_reference(h, rs))
    assert sentence_bleu(h, rs, max_n=2) == pytest.approx(_bleu_reference(h, rs, max_n=2))


@pytest.mark.parametrize("hyp, refs", BLEU_CASES[:4])  # hypotheses of >= 4 tokens: nltk floors
def test_sentence_bleu_matches_nltk(hyp, refs):  # an empty n-gram count's denominator at 1
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    h, rs = hyp.split(), [r.split() for r in refs]
    expected = 100 * bleu.sentence_bleu(rs, h, smoothing_function=bleu.SmoothingFunction().method2)
    assert sentence_bleu(h, rs) == pytest.approx(expected)


def test_self_bleu():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    # Disjoint vocabularies: unigram precision 0, which add-one smoothing (n > 1 only) keeps at 0.
    assert self_bleu(["a b c d e", "f g h i j", "k l m n o"]) == 0.0
    texts = ["the cat sat on the mat", "a dog sat on the mat", "the cat ran off", "The Cat sat"]
    toks = [t.lower().split() for t in texts]
    expected = np.mean([_bleu_reference(toks[i], toks[:i] + toks[i + 1:]) for i in range(4)])
    assert self_bleu(texts) == pytest.approx(expected)
    assert self_bleu(texts[::-1]) == pytest.approx(expected)  # order of the set does not matter
    assert 0.0 < expected < 100.0
    with pytest.raises(ValueError):
        self_bleu(["only one"])


def test_mce_can_leave_out_nearly_empty_bins():
    """Guo et al.'s MCE takes every non-empty bin; with mce_min_share a bin of a handful of
    predictions (here 1 of 1001, wrong at confidence 0.95) no longer decides it."""
    from kdexp.evaluation.analysis import CalibrationAccumulator
    conf = torch.tensor([0.55] * 1000 + [0.95], dtype=torch.float64)
    correct = torch.tensor([True] * 550 + [False] * 450 + [False])
    every, share = CalibrationAccumulator(10), CalibrationAccumulator(10, mce_min_share=0.01)
    for acc in (every, share):
        acc.add_predictions(conf, correct)
    assert every.result()["mce"] == pytest.approx(0.95) and share.result()["mce"] == pytest.approx(0.0, abs=1e-12)
    assert every.result()["ece"] == share.result()["ece"]
