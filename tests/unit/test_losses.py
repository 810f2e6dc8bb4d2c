"""kdexp.losses: the divergence library (fkl / rkl), checked against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdexp import losses
from kdexp.errors import UserError
from kdexp.losses.divergences import kl

DIVS = ["fkl", "rkl"]
SHAPES = [(3, 5, 7), (2, 3, 4, 11), (1, 13)]


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    """A float64 log-softmax over the last axis, written with numpy (not torch)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _kl64(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) = sum p * log(p / q) with explicit float64 probabilities and 0 log 0 = 0."""
    log_p, log_q = _log_softmax64(p_logits), _log_softmax64(q_logits)
    p = np.exp(log_p)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.exp(log_q)), 0.0)
    return terms.sum(-1)


def _reference(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    s64 = s.double().numpy() / temperature
    t64 = t.double().numpy() / temperature
    return _kl64(t64, s64) if name == "fkl" else _kl64(s64, t64)


def _pair(shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    return s, t


def test_names_and_parameters():
    assert {"fkl", "rkl"} <= set(losses.names())
    assert losses.names() == sorted(losses.names())
    for name in DIVS:
        assert losses.parameters(name) == {"temperature": 1.0, "chunk_size": None}


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(name, shape):
    s, t = _pair(shape, seed=len(shape))
    out = losses.divergence(name)(s, t)
    assert out.shape == shape[:-1]
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference(name, s, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DIVS)
def test_reference_on_hand_built_logits(name):
    # Hand-built, very peaked and very flat rows (one row all-equal: uniform distribution).
    s = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.0], [10.0, -3.0, 1.0, 0.5, 2.0]],
                      [[1.0, 2.0, 3.0, 4.0, 5.0], [-20.0, 20.0, 0.0, 0.0, 1.0]]])
    t = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
                      [[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 3.0, -1.0, 7.0, 0.0]]])
    out = losses.divergence(name)(s, t)
    ref = _reference(name, s, t)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)
    # Identical rows give exactly 0, different rows a positive value.
    assert out[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert (out[0] > 1e-3).all()


def test_kl_function_directly():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    out = kl(p.log(), q.log())
    # Row 0: 0.5 log 2 + 0.5 log 2 + 0 = log 2 (the p = 0 entry contributes nothing).
    assert out[0].item() == pytest.approx(np.log(2.0), rel=1e-12)
    assert out[1].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_on_identical_inputs(name, shape):
    s, _ = _pair(shape, seed=7)
    out = losses.divergence(name)(s, s.clone())
    assert out.shape == shape[:-1]
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)


@pytest.mark.parametrize("name", DIVS)
def test_nonnegative_on_random_inputs(name):
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 10.0):
        s = torch.randn(4, 6, 17) * scale
        t = torch.randn(4, 6, 17) * scale
        out = losses.divergence(name)(s, t)
        assert (out >= -1e-6).all()
        assert (out > 0).any()
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_output_is_float32(name, in_dtype):
    s, t = _pair((2, 3, 9), seed=3)
    s, t = s.to(in_dtype), t.to(in_dtype)
    out = losses.divergence(name)(s, t)
    # Reduced precision is upcast to float32; float64 is kept (so that gradcheck can run).
    assert out.dtype == (torch.float64 if in_dtype == torch.float64 else torch.float32)
    assert out.shape == (2, 3)
    # The reduced-precision inputs are upcast exactly; the result follows their float64 values.
    np.testing.assert_allclose(out.numpy(), _reference(name, s, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.7])
def test_temperature_scales_logits(name, temperature):
    s, t = _pair((3, 5, 7), seed=11)
    with_t = losses.divergence(name, temperature=temperature)(s, t)
    scaled = losses.divergence(name)(s / temperature, t / temperature)
    torch.testing.assert_close(with_t, scaled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(with_t.numpy(), _reference(name, s, t, temperature), rtol=1e-4, atol=1e-5)
    # The temperature really changes the value (the test above could otherwise pass trivially).
    assert not torch.allclose(with_t, losses.divergence(name)(s, t), rtol=1e-3)


def test_temperature_accepts_int():
    s, t = _pair((2, 5), seed=5)
    torch.testing.assert_close(losses.divergence("fkl", temperature=2)(s, t),
                               losses.divergence("fkl", temperature=2.0)(s, t))


@pytest.mark.parametrize("shape", SHAPES)
def test_fkl_is_rkl_with_roles_swapped(shape):
    s, t = _pair(shape, seed=13)
    fkl, rkl = losses.divergence("fkl"), losses.divergence("rkl")
    torch.testing.assert_close(fkl(s, t), rkl(t, s))
    # And the two directions do differ on the same arguments (KL is not symmetric).
    assert not torch.allclose(fkl(s, t), rkl(s, t), rtol=1e-3)


def _masked_teacher(seed=0):
    """Teacher logits with -inf on some vocabulary entries (p = 0 there)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, 3, 8, generator=g) * 2
    mask = torch.zeros(2, 3, 8, dtype=torch.bool)
    mask[..., 5:] = True          # a masked tail of the vocabulary, everywhere
    mask[0, 1, :2] = True         # and a few more entries at one position
    t = t.masked_fill(mask, float("-inf"))
    s = torch.randn(2, 3, 8, generator=g) * 2
    return s, t, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fkl_masked_teacher_no_nan_and_correct_gradient(temperature):
    s, t, mask = _masked_teacher()
    s32 = s.clone().requires_grad_(True)
    out = losses.divergence("fkl", temperature=temperature)(s32, t)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.detach().numpy(), _reference("fkl", s, t, temperature),
                               rtol=1e-4, atol=1e-5)
    # A non-uniform upstream gradient, so that every position's gradient is checked.
    w = torch.linspace(0.5, 2.0, out.numel()).view_as(out)
    (out * w).sum().backward()
    grad = s32.grad
    assert torch.isfinite(grad).all()

    # Reference 1: torch.autograd on a float64 formula written as cross-entropy minus entropy,
    # summing over the unmasked entries only.
    s64 = s.double().requires_grad_(True)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    p = log_p.exp()
    log_q = torch.log_softmax(s64 / temperature, -1)
    ref = (p * (log_p.masked_fill(mask, 0.0) - log_q)).sum(-1)
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-4, atol=1e-6)

    # Reference 2: the closed form d KL(p || softmax(s / T)) / ds = (q - p) / T.
    q = torch.softmax(s.double() / temperature, -1)
    analytic = (q - p) / temperature * w.double().unsqueeze(-1)
    torch.testing.assert_close(grad.double(), analytic, rtol=1e-4, atol=1e-6)


def test_rkl_masked_both_no_nan():
    # Entries masked in both models (a shared masked vocabulary): 0 log 0 everywhere there.
    s, t, mask = _masked_teacher(seed=1)
    s = s.masked_fill(mask, float("-inf"))
    leaf = s.clone().requires_grad_(True)
    out = losses.divergence("rkl")(leaf, t)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.detach().numpy(), _reference("rkl", s, t), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert not torch.isnan(leaf.grad).any()
    assert (leaf.grad[mask] == 0).all()
    # Gradient on the unmasked entries against float64 autograd of a masked formula.
    x = torch.where(mask, torch.zeros_like(s), s).double().requires_grad_(True)
    big_neg = torch.where(mask, torch.full_like(x, -1e4), x)  # exp(-1e4) == 0 in float64
    log_q = torch.log_softmax(big_neg, -1)
    log_p = torch.log_softmax(t.double(), -1)
    ref = (log_q.exp() * (log_q - log_p.masked_fill(mask, 0.0))).masked_fill(mask, 0.0).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(leaf.grad[~mask].double(), x.grad[~mask], rtol=1e-4, atol=1e-6)


def test_fkl_masked_teacher_in_bfloat16():
    s, t, _ = _masked_teacher(seed=2)
    leaf = s.bfloat16().requires_grad_(True)
    out = losses.divergence("fkl")(leaf, t.bfloat16())
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(leaf.grad.float()).all()


def test_unknown_name_suggests():
    with pytest.raises(UserError, match="did you mean") as info:
        losses.divergence("fkll")
    assert "'fkl'" in str(info.value)


def test_unknown_name_parameters():
    with pytest.raises(UserError):
        losses.parameters("nope")


def test_unknown_parameter():
    with pytest.raises(UserError) as info:
        losses.divergence("fkl", temprature=2.0)
    assert "temprature" in str(info.value)
    assert "temperature" in str(info.value).replace("temprature", "")


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, "2.0", None])
def test_bad_temperature(bad):
    with pytest.raises(UserError):
        losses.divergence("rkl", temperature=bad)
