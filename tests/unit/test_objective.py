"""kdexp.losses.objective: masked cross-entropy, weighted terms, global-token normalization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdexp.errors import UserError
from kdexp.losses.objective import IGNORE_INDEX, Objective, cross_entropy

V = 11


def _kl_per_position(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p_t || q_s) per position, float64, written independently of kdexp."""
    p = torch.softmax(t.double() / temperature, -1)
    return (p * (p.log() - torch.log_softmax(s.double() / temperature, -1))).sum(-1)


def _batch(valid_lengths, T=7, seed=0, prompt=1):
    """Logits [B, T, V] and targets [B, T] with a different number of valid tokens per row."""
    g = torch.Generator().manual_seed(seed)
    B = len(valid_lengths)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, n in enumerate(valid_lengths):
        y[b, prompt:prompt + n] = torch.randint(0, V, (n,), generator=g)
    return s, t, y


def test_ignore_index_value():
    # Must agree with torch's default so that F.cross_entropy and collate agree.
    assert IGNORE_INDEX == -100


def test_cross_entropy_matches_torch_per_position():
    s, _, y = _batch([3, 6, 1, 0], seed=1)
    out = cross_entropy(s, y)
    assert out.shape == y.shape
    assert out.dtype == torch.float32
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            if y[b, t] == IGNORE_INDEX:
                assert out[b, t].item() == 0.0
            else:
                ref = F.cross_entropy(s[b, t].double().unsqueeze(0), y[b, t].unsqueeze(0))
                # and an explicit -log softmax, computed another way
                manual = -(s[b, t].double()[y[b, t]] - torch.logsumexp(s[b, t].double(), 0))
                assert out[b, t].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
                assert out[b, t].item() == pytest.approx(manual.item(), rel=1e-5, abs=1e-6)


def test_cross_entropy_bfloat16_input_is_float32():
    s, _, y = _batch([2, 5], seed=2)
    out = cross_entropy(s.bfloat16(), y)
    assert out.dtype == torch.float32
    ref = F.cross_entropy(s.bfloat16().double().reshape(-1, V), y.reshape(-1), reduction="none")
    torch.testing.assert_close(out.double(), ref.view(y.shape), rtol=1e-5, atol=1e-5)


SPECS = {
    "ce": [{"loss": "ce", "weight": 1.0}],
    "fkl": [{"loss": "fkl", "weight": 1.0}],
    "mix": [{"loss": "ce", "weight": 0.4}, {"loss": "rkl", "weight": 0.6, "temperature": 2.0}],
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_ignored_positions_never_affect_the_loss(spec):
    obj = Objective.from_spec(SPECS[spec])
    s, t, y = _batch([2, 5, 3], seed=3)
    ignored = (y == IGNORE_INDEX).unsqueeze(-1)
    # Garbage at the ignored positions: huge (finite) values of both signs, for both models.
    g = torch.Generator().manual_seed(99)
    junk_s = torch.where(ignored, torch.randn(s.shape, generator=g) * 1e4, s)
    junk_t = torch.where(ignored, torch.randn(t.shape, generator=g) * 1e4, t)
    assert not torch.equal(junk_s, s)

    n = (y != IGNORE_INDEX).sum()
    leaf_a = s.clone().requires_grad_(True)
    leaf_b = junk_s.clone().requires_grad_(True)
    loss_a, parts_a = obj(leaf_a, t, {"targets": y}, n)
    loss_b, parts_b = obj(leaf_b, junk_t, {"targets": y}, n)
    assert torch.isfinite(loss_b)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for key in parts_a:
        torch.testing.assert_close(parts_a[key], parts_b[key], rtol=1e-6, atol=1e-6)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(leaf_a.grad, leaf_b.grad, rtol=1e-5, atol=1e-7)
    assert (leaf_b.grad[ignored.expand_as(leaf_b)] == 0).all()
    # Garbage at a *valid* position does change it (the check above is not vacuous).
    valid = (~ignored).nonzero()[0]
    s_bad = s.clone()
    s_bad[valid[0], valid[1]] = torch.randn(V, generator=g) * 1e2
    assert not torch.allclose(obj(s_bad, t, {"targets": y}, n)[0], loss_a.detach())


def test_global_token_normalization_sums_micro_batches_exactly():
    # Four sequences with very different numbers of valid target tokens.
    valid_lengths = [1, 6, 2, 5]
    s, t, y = _batch(valid_lengths, T=8, seed=4)
    # Make per-token losses differ a lot between sequences so that any weighting bias shows.
    s[1] *= 4.0
    obj = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": "fkl", "weight": 0.5}])
    n_total = (y != IGNORE_INDEX).sum()
    assert n_total.item() == sum(valid_lengths)

    full_leaf = s.clone().requires_grad_(True)
    full, full_parts = obj(full_leaf, t, {"targets": y}, n_total)
    full.backward()

    # By hand: the token mean over the whole batch.
    mask = y != IGNORE_INDEX
    ce = F.cross_entropy(s.double().reshape(-1, V), y.reshape(-1), reduction="sum") / n_total
    kd = _kl_per_position(s, t)[mask].sum() / n_total
    assert full.item() == pytest.approx((0.5 * ce + 0.5 * kd).item(), rel=1e-5)

    micro_leaf = s.clone().requires_grad_(True)
    total = torch.zeros(())
    naive = torch.zeros(())
    slices = [slice(0, 1), slice(1, 3), slice(3, 4)]  # uneven micro-batches, too
    for sl in slices:
        loss, _ = obj(micro_leaf[sl], t[sl], {"targets": y[sl]}, n_total)
        loss.backward()
        total = total + loss.detach()
        naive_loss, _ = obj(s[sl], t[sl], {"targets": y[sl]}, (y[sl] != IGNORE_INDEX).sum())
        naive = naive + naive_loss / len(slices)

    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(micro_leaf.grad, full_leaf.grad, rtol=1e-6, atol=1e-8)
    # The naive mean of per-micro-batch means is a different (biased) number.
    assert abs(naive.item() - full.item()) > 1e-2


def test_num_tokens_as_float_and_tensor_agree():
    s, t, y = _batch([3, 4], seed=5)
    obj = Objective.from_spec(SPECS["mix"])
    n = (y != IGNORE_INDEX).sum()
    a, _ = obj(s, t, {"targets": y}, n)
    b, _ = obj(s, t, {"targets": y}, float(n))
    torch.testing.assert_close(a, b)
    # Doubling the normalizer halves the loss: it is a plain sum / num_tokens.
    c, _ = obj(s, t, {"targets": y}, 2 * float(n))
    torch.testing.assert_close(c, a / 2)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_kd_weight_spec_matches_hand_computation(w):
    s, t, y = _batch([2, 6, 4], seed=6)
    spec = [{"loss": "ce", "weight": 1.0 - w}, {"loss": "fkl", "weight": w}]
    obj = Objective.from_spec(spec)
    mask = y != IGNORE_INDEX
    n = mask.sum()
    ce_mean = F.cross_entropy(s.double().reshape(-1, V), y.reshape(-1), ignore_index=-100)
    fkl_mean = _kl_per_position(s, t)[mask].mean()
    loss, parts = obj(s, t, {"targets": y}, n)
    expected = (1 - w) * ce_mean + w * fkl_mean
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert loss.dtype == torch.float32
    # Zero-weight terms are dropped: from the terms, the keys and the logged parts.
    expected_keys = [k for k, wk in (("ce", 1.0 - w), ("fkl", w)) if wk != 0]
    assert obj.keys == expected_keys
    assert sorted(parts) == sorted(expected_keys)
    if "ce" in parts:
        assert parts["ce"].item() == pytest.approx(ce_mean.item(), rel=1e-5)
        assert not parts["ce"].requires_grad
    if "fkl" in parts:
        assert parts["fkl"].item() == pytest.approx(fkl_mean.item(), rel=1e-5)
    assert obj.needs_teacher == (w != 0)


def test_pure_ce_needs_no_teacher():
    obj = Objective.from_spec([{"loss": "ce", "weight": 1.0}, {"loss": "rkl", "weight": 0}])
    assert not obj.needs_teacher
    assert len(obj.terms) == 1
    s, _, y = _batch([3, 1], seed=7)
    loss, parts = obj(s, None, {"targets": y}, (y != IGNORE_INDEX).sum())  # teacher logits never touched
    ref = F.cross_entropy(s.reshape(-1, V), y.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert list(parts) == ["ce"]


def test_divergence_term_needs_teacher():
    assert Objective.from_spec([{"loss": "fkl"}]).needs_teacher
    assert Objective.from_spec([{"loss": "ce"}, {"loss": "rkl", "weight": 0.1}]).needs_teacher
    assert Objective.from_spec([{"loss": "fkl"}]).terms[0].weight == 1.0  # default weight


def test_all_zero_weights_is_an_error():
    with pytest.raises(UserError):
        Objective.from_spec([{"loss": "ce", "weight": 0.0}, {"loss": "fkl", "weight": 0.0}])
    with pytest.raises(UserError):
        Objective.from_spec([])


def test_ce_takes_no_parameters_and_unknown_loss_errors():
    with pytest.raises(UserError):
        Objective.from_spec([{"loss": "ce", "temperature": 2.0}])
    with pytest.raises(UserError, match="did you mean"):
        Objective.from_spec([{"loss": "rkll", "weight": 1.0}])
    with pytest.raises(UserError):
        Objective.from_spec([{"loss": "fkl", "weight": 1.0, "temperature": 0.0}])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_t2_scale(temperature):
    base = {"loss": "fkl", "weight": 0.5, "temperature": temperature}
    plain = Objective.from_spec([base])
    scaled = Objective.from_spec([{**base, "t2_scale": True}])
    assert plain.terms[0].weight == pytest.approx(0.5)
    assert scaled.terms[0].weight == pytest.approx(0.5 * temperature ** 2)
    s, t, y = _batch([3, 5], seed=8)
    n = (y != IGNORE_INDEX).sum()
    mask = y != IGNORE_INDEX
    ref = _kl_per_position(s, t, temperature)[mask].sum() / n
    assert plain(s, t, {"targets": y}, n)[0].item() == pytest.approx(0.5 * ref.item(), rel=1e-5)
    assert scaled(s, t, {"targets": y}, n)[0].item() == pytest.approx(0.5 * temperature ** 2 * ref.item(), rel=1e-5)


def test_same_loss_twice_gets_distinct_keys():
    spec = [{"loss": "ce", "weight": 1.0},
            {"loss": "fkl", "weight": 1.0, "temperature": 1.0},
            {"loss": "fkl", "weight": 1.0, "temperature": 3.0}]
    obj = Objective.from_spec(spec)
    assert len(obj.keys) == 3
    assert len(set(obj.keys)) == 3
    assert obj.keys[0] == "ce"  # a unique name keeps its own key
    s, t, y = _batch([4, 2], seed=9)
    mask = y != IGNORE_INDEX
    n = mask.sum()
    loss, parts = obj(s, t, {"targets": y}, n)
    assert set(parts) == set(obj.keys)
    ref1 = _kl_per_position(s, t, 1.0)[mask].sum() / n
    ref3 = _kl_per_position(s, t, 3.0)[mask].sum() / n
    assert parts[obj.keys[1]].item() == pytest.approx(ref1.item(), rel=1e-5)
    assert parts[obj.keys[2]].item() == pytest.approx(ref3.item(), rel=1e-5)
    assert loss.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-5)


# ----------------------------------------------------------------------------- adaptive weight
def test_adaptive_term_scales_to_the_ce_magnitude():
    s, t, y = _batch([3, 5], seed=30)
    n = int((y != IGNORE_INDEX).sum())
    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5},
                                     {"loss": "fkl", "weight": 0.5, "adaptive": True}])
    # Before any update the scale is 1: a plain 0.5 / 0.5 mix.
    loss0, parts = objective(s, t, {"targets": y}, n)
    assert loss0.item() == pytest.approx(0.5 * parts["ce"].item() + 0.5 * parts["fkl"].item(), rel=1e-6)
    # Step values 4.0 (ce) and 0.01 (fkl): the scale becomes 400, then an EMA with momentum 0.9.
    objective.update({"ce": 4.0, "fkl": 0.01})
    assert objective.scale("fkl") == pytest.approx(400.0)
    objective.update({"ce": 2.0, "fkl": 0.03})
    ema_ce, ema_kd = 0.9 * 4.0 + 0.1 * 2.0, 0.9 * 0.01 + 0.1 * 0.03
    assert objective.scale("fkl") == pytest.approx(ema_ce / ema_kd)
    loss, parts = objective(s, t, {"targets": y}, n)
    expected = 0.5 * parts["ce"].item() + 0.5 * (ema_ce / ema_kd) * parts["fkl"].item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert objective.weights() == {"ce": 0.5, "fkl": pytest.approx(0.5 * ema_ce / ema_kd)}


def test_adaptive_state_round_trips_and_is_bounded():
    spec = [{"loss": "ce", "weight": 0.5}, {"loss": "rkl", "weight": 0.5, "adaptive": True}]
    a = Objective.from_spec(spec)
    a.update({"ce": 3.0, "rkl": 1e-9})
    assert a.scale("rkl") == Objective.SCALE_RANGE[1]
    b = Objective.from_spec(spec)
    b.load_state_dict(a.state_dict())
    assert b.weights() == a.weights()
    # A non-adaptive objective ignores updates.
    plain = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": "rkl", "weight": 0.5}])
    plain.update({"ce": 3.0, "rkl": 0.1})
    assert plain.weights() == {"ce": 0.5, "rkl": 0.5}


def test_adaptive_needs_a_ce_term_and_ce_cannot_be_adaptive():
    with pytest.raises(UserError, match="ce term"):
        Objective.from_spec([{"loss": "fkl", "weight": 1.0, "adaptive": True}])
    with pytest.raises(UserError):
        Objective.from_spec([{"loss": "ce", "weight": 1.0, "adaptive": True}])


# ----------------------------------------------------------------------------- sample weights
def test_sample_weights_by_hand():
    from kdexp.losses.objective import sequence_weights

    # Two sequences over V = 2 with hand-set log-probabilities of their targets.
    logits = torch.log(torch.tensor([[[0.8, 0.2], [0.5, 0.5], [0.5, 0.5]],
                                     [[0.01, 0.99], [0.01, 0.99], [0.3, 0.7]]]))
    y = torch.tensor([[0, 1, IGNORE_INDEX], [0, 0, IGNORE_INDEX]])
    w = sequence_weights(logits, y, min_weight=0.1)
    g0 = (0.8 * 0.5) ** 0.5          # geometric mean of the target probabilities: 0.632
    g1 = max((0.01 * 0.01) ** 0.5, 0.1)  # 0.01, clamped to 0.1
    torch.testing.assert_close(w, torch.tensor([g0, g1]))  # raw: the step normalizes them
    # A row without valid targets gets 0.
    y3 = torch.cat([y, torch.full((1, 3), IGNORE_INDEX)])
    w3 = sequence_weights(torch.cat([logits, logits[:1]]), y3, min_weight=0.1)
    torch.testing.assert_close(w3, torch.cat([w, torch.zeros(1)]))


def _weighted_by_hand(s, t, y, source, min_weight, spec_weights):
    """The step's loss with per-sequence weights normalized to mean 1 over all of its sequences
    that have a target, written without kdexp's objective (float64)."""
    mask = y != IGNORE_INDEX
    logits = (t if source == "teacher_likelihood" else s).double()
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    gm = torch.exp((logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)).clamp_min(min_weight)
    has = mask.any(-1)
    w = torch.where(has, gm / gm[has].mean(), 0.0)[:, None]
    n = mask.sum()
    ce = -(torch.log_softmax(s.double(), -1).gather(-1, y.clamp_min(0)[..., None]).squeeze(-1) * mask * w).sum() / n
    kd = (_kl_per_position(s, t) * mask * w).sum() / n
    return spec_weights[0] * ce + spec_weights[1] * kd, {"ce": ce, "fkl": kd}


def _step(objective, s, t, y, slices):
    """One optimizer step as the loop takes it: each micro-batch's loss over the step's token
    count, backward, values summed; then the step's sample-weight normalization, applied to
    the values and to the accumulated gradient. (loss, values, gradient of s)"""
    leaf = s.clone().requires_grad_(True)
    n = float((y != IGNORE_INDEX).sum())
    values: dict[str, float] = {}
    for sl in slices:
        loss, parts = objective(leaf[sl], t[sl], {"targets": y[sl]}, n)
        loss.backward()
        for k, v in parts.items():
            values[k] = values.get(k, 0.0) + float(v)
    factor = objective.normalize_step(values)
    grad = leaf.grad * factor
    weights = objective.weights()
    return sum(weights[k] * values[k] for k in objective.keys), values, grad


@pytest.mark.parametrize("source", ["teacher_likelihood", "student_likelihood"])
def test_sample_weights_are_normalized_over_the_step_whatever_the_split(source):
    """The same 4 sequences as 1 x 4, 2 x 2 and 4 x 1 micro-batches: the same loss and gradient,
    equal to the by-hand weighted mean with the weights normalized over all 4 sequences (a
    per-micro-batch normalization does nothing at micro-batch size 1)."""
    s, t, y = _batch([3, 5, 2, 6], T=8, seed=33)
    s[2] *= 3.0  # sequences of very different likelihoods
    spec = [{"loss": "ce", "weight": 0.3}, {"loss": "fkl", "weight": 0.7}]
    objective = Objective.from_spec(spec, sample_weight=source, min_weight=0.05)
    expected, expected_parts = _weighted_by_hand(s, t, y, source, 0.05, (0.3, 0.7))
    ref_leaf = s.clone().double().requires_grad_(True)
    _weighted_by_hand(ref_leaf, t, y, source, 0.05, (0.3, 0.7))[0].backward()
    unweighted = Objective.from_spec(spec)(s, t, {"targets": y}, float((y != IGNORE_INDEX).sum()))[0]
    assert abs(unweighted.item() - expected.item()) > 1e-2  # the weights do matter here
    splits = {"1x4": [slice(0, 4)], "2x2": [slice(0, 2), slice(2, 4)],
              "4x1": [slice(i, i + 1) for i in range(4)]}
    for name, slices in splits.items():
        loss, values, grad = _step(objective, s, t, y, slices)
        assert loss == pytest.approx(expected.item(), rel=1e-5), name
        for k in ("ce", "fkl"):
            assert values[k] == pytest.approx(expected_parts[k].item(), rel=1e-5), (name, k)
        if source == "teacher_likelihood":  # weights of the student's likelihood are detached
            torch.testing.assert_close(grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_micro_batch_of_one_sequence_is_weighted_against_the_others():
    # Micro-batches of 1: a per-micro-batch normalization would make every weight 1.
    s, t, y = _batch([4, 4], T=6, seed=34)
    t[1] = t[1] * 0.0  # the teacher is uniform on sequence 1: a low likelihood, a small weight
    spec = [{"loss": "fkl", "weight": 1.0}]
    weighted = Objective.from_spec(spec, sample_weight="teacher_likelihood", min_weight=0.01)
    plain = Objective.from_spec(spec)
    loss_w = _step(weighted, s, t, y, [slice(0, 1), slice(1, 2)])[0]
    loss_p = _step(plain, s, t, y, [slice(0, 1), slice(1, 2)])[0]
    assert abs(loss_w - loss_p) > 1e-3


@pytest.mark.parametrize("source", ["teacher_likelihood", "student_likelihood"])
def test_sample_weight_multiplies_each_sequence(source):
    from kdexp.losses.objective import sequence_weights

    s, t, y = _batch([3, 5, 2], seed=31)
    n = int((y != IGNORE_INDEX).sum())
    spec = [{"loss": "ce", "weight": 0.3}, {"loss": "fkl", "weight": 0.7}]
    weighted = Objective.from_spec(spec, sample_weight=source, min_weight=0.05)
    assert weighted.needs_teacher
    w = sequence_weights(t if source == "teacher_likelihood" else s, y, 0.05)
    loss, parts = weighted(s, t, {"targets": y}, n)
    mask = y != IGNORE_INDEX
    ce = (cross_entropy(s, y) * w[:, None] * mask).sum() / n
    kd = (_kl_per_position(s, t).float() * w[:, None] * mask).sum() / n
    # A micro-batch uses the raw weights; the step divides by their mean.
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["fkl"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * kd.item(), rel=1e-5)
    values = {k: float(v) for k, v in parts.items()}
    factor = weighted.normalize_step(values)
    assert factor == pytest.approx(3 / w.sum().item(), rel=1e-6)
    assert values["sample_weight_mean"] == pytest.approx(w.sum().item() / 3, rel=1e-6)
    assert values["ce"] == pytest.approx(ce.item() * factor, rel=1e-5)
    # The weights are detached: the gradient is that of the weighted sum with w held fixed.
    leaf = s.clone().requires_grad_(True)
    weighted(leaf, t, {"targets": y}, n)[0].backward()
    ref_leaf = s.clone().requires_grad_(True)
    ref = (0.3 * (cross_entropy(ref_leaf, y) * w[:, None] * mask).sum() / n
           + 0.7 * (_kl_per_position(ref_leaf, t).float() * w[:, None] * mask).sum() / n)
    ref.backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-6)


def test_sample_weight_choices_are_checked():
    with pytest.raises(UserError, match="sample_weight"):
        Objective.from_spec([{"loss": "ce"}], sample_weight="teacher")
    with pytest.raises(UserError, match="min_weight"):
        Objective.from_spec([{"loss": "ce"}], sample_weight="student_likelihood", min_weight=0.0)
    assert not Objective.from_spec([{"loss": "ce"}], sample_weight="student_likelihood").needs_teacher
