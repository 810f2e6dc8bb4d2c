"""Every divergence of kdexp.losses against a float64 numpy reference written from its formula.

The references below work in probability space with explicit sums (no log-space tricks, no
torch), so they share no code with the library. Properties (zero at p = q, non-negativity,
limits, chunked == plain, bf16, -inf logits, gradcheck) run over every registered name.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdexp import losses
from kdexp.errors import UserError

ALL = losses.names()
# Parameters that move every divergence away from its defaults, to test non-default paths too.
NON_DEFAULT = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.25}, "srkl": {"alpha": 0.4},
               "akl": {"mu": 0.7}, "ab": {"alpha": 0.5, "beta": 1.5}, "alpha": {"alpha": 0.3},
               "taid": {"t": 0.8}, "amid": {"alpha": 0.5, "lam": 0.3}}


# ----------------------------------------------------------------------------- references
def softmax64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def xlogy_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * log(a / b) elementwise with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / b), 0.0)


def ref_kl(p, q):
    return xlogy_ratio(p, q).sum(-1)


def ref_akl(p, q, mu):
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        pr, qr = p[idx], q[idx]
        head, mass = [], 0.0
        for v in np.argsort(-pr, kind="stable"):
            head.append(v)
            mass += pr[v]
            if mass >= mu:
                break
        in_head = np.zeros(pr.shape, dtype=bool)
        in_head[head] = True
        g_head = np.abs(pr - qr)[in_head].sum()
        g_tail = np.abs(pr - qr)[~in_head].sum()
        w = g_head / (g_head + g_tail)
        out[idx] = w * ref_kl(pr, qr) + (1 - w) * ref_kl(qr, pr)
    return out


def ref_ab(p, q, a, b):
    if a == 0 and b == 0:
        return 0.5 * ((np.log(p) - np.log(q)) ** 2).sum(-1)
    if b == 0:
        return (p**a * np.log(p**a / q**a) - p**a + q**a).sum(-1) / a**2
    if a == 0:
        return (q**b * np.log(q**b / p**b) - q**b + p**b).sum(-1) / b**2
    if a + b == 0:
        return (np.log(q**a / p**a) + (q**a / p**a) ** -1 - 1).sum(-1) / a**2
    return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


def ref_amid(p, q, alpha, lam, base="fkl"):
    if alpha == 1:
        r = p**lam * q ** (1 - lam)
    else:
        g = (1 - alpha) / 2
        r = (lam * p**g + (1 - lam) * q**g) ** (1 / g)
    r = r / r.sum(-1, keepdims=True)
    return ref_kl(p, r) if base == "fkl" else ref_kl(r, p)


def reference(name: str, s, t, /, temperature=1.0, **kw) -> np.ndarray:
    """The divergence from its textbook formula, float64, p = teacher, q = student."""
    s64 = np.asarray(s.detach().double(), dtype=np.float64) / temperature
    t64 = np.asarray(t.detach().double(), dtype=np.float64) / temperature
    p, q = softmax64(t64), softmax64(s64)
    params = {**{k: v for k, v in losses.parameters(name).items()
                 if k not in ("temperature", "chunk_size")}, **kw}
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "jsd":
        b = params["beta"]
        m = b * p + (1 - b) * q
        return b * ref_kl(p, m) + (1 - b) * ref_kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skl":
        return ref_kl(p, params["alpha"] * p + (1 - params["alpha"]) * q)
    if name == "srkl":
        return ref_kl(q, params["alpha"] * q + (1 - params["alpha"]) * p)
    if name == "akl":
        return ref_akl(p, q, params["mu"])
    if name == "ab":
        return ref_ab(p, q, params["alpha"], params["beta"])
    if name == "alpha":
        a = params["alpha"]
        return (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))
    if name == "taid":
        tt = params["t"]
        pt = softmax64((1 - tt) * s64 + tt * t64)
        return ref_kl(pt, q)
    if name == "amid":
        return ref_amid(p, q, params["alpha"], params["lam"], params["base"])
    raise AssertionError(f"no reference for {name}")


def pair(shape, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).to(dtype),
            torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).to(dtype))


# ----------------------------------------------------------------------------- values
def test_every_issue_name_is_registered():
    assert set(ALL) == {"fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "ab", "alpha", "taid", "amid"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("params", ["default", "other"])
def test_matches_reference(name, params):
    kw = NON_DEFAULT.get(name, {}) if params == "other" else {}
    s, t = pair((3, 4, 13), seed=1)
    out = losses.divergence(name, **kw)(s, t)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference(name, s, t, **kw), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("name", ALL)
def test_matches_reference_with_temperature(name):
    s, t = pair((2, 5, 9), seed=2, scale=4.0)
    out = losses.divergence(name, temperature=2.5)(s, t)
    np.testing.assert_allclose(out.numpy(), reference(name, s, t, temperature=2.5), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("name", ALL)
def test_zero_when_p_equals_q(name):
    s, _ = pair((4, 3, 11), seed=3, scale=3.0)
    out = losses.divergence(name, **NON_DEFAULT.get(name, {}))(s, s.clone())
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_nonnegative_and_positive_on_random_inputs(name):
    for seed, scale in enumerate((0.1, 1.0, 8.0)):
        s, t = pair((5, 7, 31), seed=10 + seed, scale=scale)
        out = losses.divergence(name)(s, t)
        assert torch.isfinite(out).all()
        assert (out >= 0).all()
        assert (out > 0).float().mean() > 0.9


# ----------------------------------------------------------------------------- limits
def test_jsd_endpoints_are_fkl_and_rkl_and_interior_tends_to_zero():
    s, t = pair((3, 6, 17), seed=4)
    jsd = lambda b: losses.divergence("jsd", beta=b)(s, t)  # noqa: E731
    torch.testing.assert_close(jsd(0.0), losses.divergence("fkl")(s, t))
    torch.testing.assert_close(jsd(1.0), losses.divergence("rkl")(s, t))
    # The mixture formula itself degenerates: JSD(beta) ~ beta * KL(p||q) as beta -> 0.
    small = jsd(1e-4) / 1e-4
    torch.testing.assert_close(small, losses.divergence("fkl")(s, t), rtol=2e-2, atol=1e-4)


def test_skew_kl_limits():
    s, t = pair((3, 6, 17), seed=5)
    torch.testing.assert_close(losses.divergence("skl", alpha=0.0)(s, t), losses.divergence("fkl")(s, t))
    torch.testing.assert_close(losses.divergence("srkl", alpha=0.0)(s, t), losses.divergence("rkl")(s, t))
    # Skewing bounds the divergence by log(1 / alpha).
    big_s, big_t = pair((3, 6, 17), seed=5, scale=30.0)
    assert (losses.divergence("skl", alpha=0.1)(big_s, big_t) <= math.log(10) + 1e-5).all()


@pytest.mark.parametrize("alpha, beta, same_as", [(1.0, 0.0, "fkl"), (0.0, 1.0, "rkl")])
def test_ab_special_points_are_kl(alpha, beta, same_as):
    s, t = pair((3, 6, 17), seed=6)
    torch.testing.assert_close(losses.divergence("ab", alpha=alpha, beta=beta)(s, t),
                               losses.divergence(same_as)(s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.0), (0.0, 0.5), (0.7, 0.0), (0.6, -0.6), (-0.4, 0.4),
                                         (2.0, 0.0), (0.0, 2.0)])
def test_ab_special_points_are_the_limits_of_the_general_formula(alpha, beta):
    s, t = pair((2, 4, 9), seed=7)
    exact = losses.divergence("ab", alpha=alpha, beta=beta)(s, t)
    np.testing.assert_allclose(exact.numpy(), reference("ab", s, t, alpha=alpha, beta=beta), rtol=1e-4, atol=1e-6)
    # Approach the special point along both axes with the general float64 formula.
    eps = 1e-5
    for da, db in ((eps, 0.0), (0.0, eps), (eps, eps)):
        a, b = alpha + da, beta + db
        if a == 0 or b == 0 or a + b == 0:
            continue
        near = reference("ab", s, t, alpha=a, beta=b)
        np.testing.assert_allclose(exact.numpy(), near, rtol=1e-3, atol=1e-5)


def test_alpha_divergence_limits_are_exact_and_continuous():
    s, t = pair((3, 6, 17), seed=8)
    fkl, rkl = losses.divergence("fkl")(s, t), losses.divergence("rkl")(s, t)
    torch.testing.assert_close(losses.divergence("alpha", alpha=1.0)(s, t), fkl)
    torch.testing.assert_close(losses.divergence("alpha", alpha=0.0)(s, t), rkl)
    # Next to the limits float32 keeps its digits (no 1 - sum cancellation).
    torch.testing.assert_close(losses.divergence("alpha", alpha=1 - 1e-5)(s, t), fkl, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(losses.divergence("alpha", alpha=1e-5)(s, t), rkl, rtol=1e-3, atol=1e-5)
    # Outside [0, 1] it is still the formula.
    for a in (-0.5, 1.5):
        np.testing.assert_allclose(losses.divergence("alpha", alpha=a)(s, t).numpy(),
                                   reference("alpha", s, t, alpha=a), rtol=2e-4, atol=1e-6)


def test_taid_endpoints_and_gradient_through_student_only():
    s, t = pair((3, 6, 17), seed=9)
    torch.testing.assert_close(losses.divergence("taid", t=1.0)(s, t), losses.divergence("fkl")(s, t))
    assert torch.allclose(losses.divergence("taid", t=0.0)(s, t), torch.zeros(3, 6), atol=1e-6)
    # The target is detached: d/ds KL(p_t || softmax(s/T)) = (q - p_t) / T, with p_t held fixed.
    temperature, tt = 1.5, 0.6
    leaf = s.clone().requires_grad_(True)
    losses.divergence("taid", t=tt, temperature=temperature)(leaf, t).sum().backward()
    q = softmax64(s.double().numpy() / temperature)
    pt = softmax64((1 - tt) * s.double().numpy() / temperature + tt * t.double().numpy() / temperature)
    np.testing.assert_allclose(leaf.grad.numpy(), (q - pt) / temperature, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [-3.0, -1.0, 0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("base", ["fkl", "rkl"])
def test_amid_against_reference(alpha, base):
    s, t = pair((2, 5, 11), seed=12)
    out = losses.divergence("amid", alpha=alpha, lam=0.3, base=base)(s, t)
    np.testing.assert_allclose(out.numpy(), ref_amid(softmax64(t.double().numpy()),
                                                     softmax64(s.double().numpy()), alpha, 0.3, base),
                               rtol=2e-4, atol=1e-6)


def test_amid_special_cases():
    s, t = pair((2, 5, 11), seed=13)
    # alpha = -1 is the arithmetic mixture: with base fkl, DistiLLM's skew KL.
    torch.testing.assert_close(losses.divergence("amid", alpha=-1.0, lam=0.2)(s, t),
                               losses.divergence("skl", alpha=0.2)(s, t), rtol=1e-5, atol=1e-6)
    # lam = 1 makes the assistant the teacher itself (divergence 0); lam = 0 the student (fkl).
    assert torch.allclose(losses.divergence("amid", alpha=0.5, lam=1.0)(s, t), torch.zeros(2, 5), atol=1e-6)
    torch.testing.assert_close(losses.divergence("amid", alpha=0.5, lam=0.0)(s, t),
                               losses.divergence("fkl")(s, t), rtol=1e-5, atol=1e-6)
    # Continuity at alpha = 1 (the geometric mixture).
    torch.testing.assert_close(losses.divergence("amid", alpha=1.0, lam=0.3)(s, t),
                               losses.divergence("amid", alpha=1.0 + 1e-4, lam=0.3)(s, t), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- AKL by hand
def test_akl_on_hand_built_distributions():
    # Vocabulary order deliberately differs from teacher-sorted order, so that a head mask
    # built in sorted order and applied to unsorted values (one public port's bug) is wrong.
    p = np.array([0.05, 0.40, 0.10, 0.30, 0.15])
    q = np.array([0.30, 0.20, 0.20, 0.10, 0.20])
    t, s = torch.tensor(np.log(p)).float(), torch.tensor(np.log(q)).float()
    # mu = 0.5: sorted p is 0.40 (v1), 0.30 (v3), ...; the head is {v1, v3} (0.40 < 0.5 <= 0.70).
    g_head = abs(0.40 - 0.20) + abs(0.30 - 0.10)
    g_tail = abs(0.05 - 0.30) + abs(0.10 - 0.20) + abs(0.15 - 0.20)
    w = g_head / (g_head + g_tail)
    expected = w * ref_kl(p, q) + (1 - w) * ref_kl(q, p)
    assert losses.divergence("akl", mu=0.5)(s, t).item() == pytest.approx(expected, rel=1e-5)
    # The wrong ports give different numbers here: a mask applied in vocabulary order ...
    bad_head = np.array([True, True, False, False, False])
    gb, gt = np.abs(p - q)[bad_head].sum(), np.abs(p - q)[~bad_head].sum()
    wrong = gb / (gb + gt) * ref_kl(p, q) + gt / (gb + gt) * ref_kl(q, p)
    assert abs(wrong - expected) > 1e-3
    # ... and teacher and student swapped.
    assert abs(losses.divergence("akl", mu=0.5)(t, s).item() - expected) > 1e-3
    # mu small: the head is the top token alone; mu = 1: everything is head (pure fkl).
    g_head = abs(0.40 - 0.20)
    w = g_head / np.abs(p - q).sum()
    assert losses.divergence("akl", mu=0.01)(s, t).item() == pytest.approx(
        w * ref_kl(p, q) + (1 - w) * ref_kl(q, p), rel=1e-5)
    assert losses.divergence("akl", mu=1.0)(s, t).item() == pytest.approx(ref_kl(p, q), rel=1e-5)


def test_akl_gap_weights_are_detached():
    s, t = pair((2, 3, 10), seed=14)
    leaf = s.clone().requires_grad_(True)
    losses.divergence("akl")(leaf, t).sum().backward()
    # Reference gradient: the weights held constant, gradients of fkl and rkl mixed by them.
    p, q = softmax64(t.double().numpy()), softmax64(s.double().numpy())
    ref_leaf = s.double().clone().requires_grad_(True)
    log_q = torch.log_softmax(ref_leaf, -1)
    log_p = torch.tensor(np.log(p))
    w = torch.tensor(_akl_weights(p, q, 0.5))
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    (w * fkl + (1 - w) * rkl).sum().backward()
    np.testing.assert_allclose(leaf.grad.numpy(), ref_leaf.grad.numpy(), rtol=1e-4, atol=1e-6)


def _akl_weights(p, q, mu):
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        order = np.argsort(-p[idx], kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[idx][order])[:-1]])
        head = np.zeros(p.shape[-1], dtype=bool)
        head[order[before < mu]] = True
        gap = np.abs(p[idx] - q[idx])
        out[idx] = gap[head].sum() / gap.sum()
    return out


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", [n for n in ALL if n not in ("akl", "taid")])
def test_gradcheck_float64(name):
    # akl and taid hold part of the graph fixed on purpose (detached weights / target); their
    # gradients are checked against closed forms above instead.
    s, t = pair((2, 3, 6), seed=15, dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = losses.divergence(name, **NON_DEFAULT.get(name, {}), temperature=1.3)
    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("chunk", [1, 10, 47, 500])
def test_chunked_equals_plain_values_and_gradients(name, chunk):
    s, t = pair((3, 47, 123), seed=16)
    plain_s, plain_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    chunk_s, chunk_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    params = NON_DEFAULT.get(name, {})
    plain = losses.divergence(name, **params)(plain_s, plain_t)
    chunked = losses.divergence(name, chunk_size=chunk, **params)(chunk_s, chunk_t)
    assert chunked.shape == plain.shape == (3, 47)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-7)
    upstream = torch.rand(3, 47, generator=torch.Generator().manual_seed(0))
    (plain * upstream).sum().backward()
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunk_s.grad, plain_s.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunk_t.grad, plain_t.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("chunk", [None, 7, "auto"])
def test_masked_positions_are_skipped_with_the_same_values_and_gradients(name, chunk):
    """With a mask (the positions that have targets), the masked-in values and gradients are
    the plain path's, the others 0: nothing is computed for prompt and padding positions."""
    s, t = pair((3, 20, 50), seed=21)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[2] = False  # a row without targets
    params = NON_DEFAULT.get(name, {})
    plain_s, plain_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    masked_s, masked_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    plain = losses.divergence(name, **params)(plain_s, plain_t)
    masked = losses.divergence(name, chunk_size=chunk, **params)(masked_s, masked_t, mask)
    torch.testing.assert_close(masked[mask], plain[mask], rtol=1e-6, atol=1e-7)
    assert torch.all(masked[~mask] == 0)
    upstream = torch.rand(3, 20, generator=torch.Generator().manual_seed(2))
    (torch.where(mask, plain, 0.0) * upstream).sum().backward()
    (masked * upstream).sum().backward()
    torch.testing.assert_close(masked_s.grad, plain_s.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(masked_t.grad, plain_t.grad, rtol=1e-6, atol=1e-7)
    assert torch.all(masked_s.grad[~mask] == 0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_float64_masked_logits_keep_their_precision(chunk):
    """A float64 reference through the masked (and chunked) path stays float64 and exact."""
    s, t = (torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in (3, 4))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    got = losses.divergence("fkl", chunk_size=chunk)(s, t, mask)
    want = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-12)


def test_auto_chunks_by_vocabulary_size(monkeypatch):
    fkl = losses.divergence("fkl", chunk_size="auto")
    assert fkl.chunk_rows(152064) == 256 and fkl.chunk_rows(32000) == 1216 and fkl.chunk_rows(10**9) == 1
    from kdexp.losses import bound

    monkeypatch.setattr(bound, "AUTO_CHUNK_ELEMENTS", 5 * 123)  # 5 positions per chunk at V = 123
    calls = []
    monkeypatch.setattr(bound, "chunked", lambda fn, rows, s, t, mask: calls.append(rows) or fn(s, t))
    s, t = pair((3, 47, 123), seed=16)
    fkl(s, t)
    fkl(s[:1, :5], t[:1, :5])  # one chunk's worth: the plain path
    assert calls == [5]
    with pytest.raises(UserError, match="chunk_size must be a positive integer, auto or null"):
        losses.divergence("fkl", chunk_size="big")


def test_chunked_on_vocab_sliced_logits_and_frozen_teacher():
    # Logits sliced to a shared vocabulary (non-contiguous) and a teacher without gradient.
    s_full, t_full = pair((2, 9, 40), seed=17)
    s = s_full.clone().requires_grad_(True)
    plain = losses.divergence("fkl")(s[..., :33], t_full[..., :33])
    plain.sum().backward()
    g_plain, s.grad = s.grad.clone(), None
    chunked = losses.divergence("fkl", chunk_size=4)(s[..., :33], t_full[..., :33])
    chunked.sum().backward()
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(s.grad, g_plain)


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_inputs_close_to_float32(name):
    s, t = pair((3, 8, 64), seed=18)
    s16, t16 = s.bfloat16(), t.bfloat16()
    out16 = losses.divergence(name)(s16, t16)
    assert out16.dtype == torch.float32
    # Same values as float32 on the bf16-rounded logits (the computation itself is float32) ...
    torch.testing.assert_close(out16, losses.divergence(name)(s16.float(), t16.float()))
    # ... and within bf16 rounding of the float32 logits' result.
    torch.testing.assert_close(out16, losses.divergence(name)(s, t), rtol=5e-2, atol=2e-2)


@pytest.mark.parametrize("name", ALL)
def test_bf16_teacher_against_float32_student_is_nonnegative(name):
    s, _ = pair((4, 8, 200), seed=19, scale=5.0)
    t = s.bfloat16()  # a teacher that is the student up to bf16 rounding
    out = losses.divergence(name)(s, t)
    assert (out >= 0).all() and torch.isfinite(out).all()
    assert out.max() < 1e-2


def _with_inf(seed, where):
    s, t = pair((2, 4, 12), seed=seed, scale=3.0)
    mask = torch.zeros(2, 4, 12, dtype=torch.bool)
    mask[..., 9:] = True
    mask[1, 2, :3] = True
    if where in ("teacher", "both"):
        t = t.masked_fill(mask, float("-inf"))
    if where in ("student", "both"):
        s = s.masked_fill(mask, float("-inf"))
    return s, t, mask


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["teacher", "student", "both"])
def test_minus_inf_logits_give_finite_values_and_gradients(name, where):
    s, t, mask = _with_inf(20, where)
    leaf_s, leaf_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = losses.divergence(name, temperature=1.5)(leaf_s, leaf_t)
    assert torch.isfinite(out).all() and (out >= 0).all()
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    assert torch.isfinite(leaf_s.grad).all() and torch.isfinite(leaf_t.grad).all()
    if where == "both":
        # Entries outside both supports play no part: the value is that of the trimmed
        # vocabulary wherever the mask is the same block, and they get no gradient.
        assert (leaf_s.grad[mask] == 0).all()
        keep = slice(0, 9)
        trimmed = losses.divergence(name, temperature=1.5)(s[0, :, keep], t[0, :, keep])
        torch.testing.assert_close(out[0].detach(), trimmed, rtol=1e-5, atol=1e-6)


def test_mixtures_take_no_unclamped_log_where_both_are_zero():
    # p = q = 0 on shared entries, and p, q underflowing at low temperature: no NaN anywhere.
    s = torch.tensor([[0.0, -300.0, float("-inf"), 5.0]])
    t = torch.tensor([[0.0, float("-inf"), float("-inf"), -400.0]])
    for name in ALL:
        leaf = s.clone().requires_grad_(True)
        out = losses.divergence(name, temperature=0.05)(leaf, t)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all(), name


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name, params", [("jsd", {"beta": 1.5}), ("skl", {"alpha": 1.0}),
                                          ("srkl", {"alpha": -0.1}), ("akl", {"mu": 0.0}),
                                          ("taid", {"t": 2.0}), ("amid", {"lam": -1.0}),
                                          ("amid", {"base": "amid"}), ("amid", {"base": "fkll"}),
                                          ("jsd", {"beta": "high"}), ("ab", {"alpha": float("nan")}),
                                          ("fkl", {"chunk_size": 0}), ("fkl", {"chunk_size": 2.5})])
def test_bad_parameters_are_user_errors_at_construction(name, params):
    with pytest.raises(UserError):
        losses.divergence(name, **params)


def test_repr_names_the_parameters():
    assert repr(losses.divergence("jsd", beta=0.9)) == "divergence('jsd', beta=0.9)"


# ----------------------------------------------------------------------------- finite values untouched
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_very_unlikely_finite_student_token_keeps_its_value_and_gradient(dtype):
    # p = (0.5, 0.5); the student gives the second token log q = -91 (below log of the smallest
    # normal float32, -87.3). KL(p || q) = 0.5 log 0.5 - 0.5 log q1 + 0.5 log 0.5 - 0.5 log q2,
    # and its gradient in the student's logit of that token is q2 - p2 = -0.5. A floor on
    # finite log-probabilities reads 43.5 instead and a gradient of ~1e-40.
    s = torch.tensor([[0.0, -91.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[0.0, 0.0]], dtype=dtype)
    out = losses.divergence("fkl")(s, t)
    log_q = torch.log_softmax(s.detach().double(), -1)
    expected = (0.5 * (math.log(0.5) - log_q)).sum()
    torch.testing.assert_close(out.double().squeeze(), expected, rtol=1e-6, atol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(s.grad.float(), torch.tensor([[0.5, -0.5]]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ALL)
def test_values_match_the_reference_on_very_peaked_logits(name):
    # Logits with std 30: many log-probabilities far below -87 (finite), in both models.
    s, t = pair((4, 6, 40), seed=21, scale=30.0)
    out = losses.divergence(name)(s, t).double().numpy()
    ref = reference(name, s, t)
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl", "alpha", "ab", "amid"])
def test_gradients_through_very_unlikely_tokens_match_the_reference(name):
    # Central differences of the float64 numpy reference: where the student's log q is far below
    # -87 on a token the teacher supports, the gradient is large; a floor on finite values
    # makes it 0. (akl and taid detach part of their formula, so their gradient is not the
    # reference's.)
    s, t = pair((2, 3, 16), seed=22, scale=30.0)
    leaf = s.clone().requires_grad_(True)
    losses.divergence(name)(leaf, t).sum().backward()
    numeric = torch.zeros_like(s, dtype=torch.float64)
    h = 1e-4
    for idx in np.ndindex(*s.shape):
        up, down = s.double().clone(), s.double().clone()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = float((reference(name, up, t).sum() - reference(name, down, t).sum()) / (2 * h))
    torch.testing.assert_close(leaf.grad.double(), numeric, rtol=1e-3, atol=2e-3)
