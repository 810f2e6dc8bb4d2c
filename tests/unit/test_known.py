"""Distribution-level fits with a known answer (kdexp/known/distributions.py), on the library's
own divergences: each minimum is where theory puts it."""

from __future__ import annotations

import math

import pytest
import torch

from kdexp import losses
from kdexp.known import distributions as kd


def test_the_mixture_on_the_grid_has_the_closed_form_moments():
    """0.5 N(-3, 1) + 0.5 N(3, 1): mean 0, variance 1 + 9 = 10 (the grid is fine and wide)."""
    mean, std = kd.mixture_moments()
    assert abs(mean) < 1e-9 and std == pytest.approx(math.sqrt(10), abs=1e-6)


def test_forward_kl_fits_a_gaussian_by_moment_matching():
    """Minka (2005): KL(p || q) over an exponential family is minimized by matching p's
    sufficient statistics; a discretized Gaussian on the grid has statistics x and x^2."""
    fit = kd.fit_gaussian("fkl")
    mean, std = kd.mixture_moments()
    assert fit.mean == pytest.approx(mean, abs=1e-4) and fit.std == pytest.approx(std, abs=1e-4)
    assert fit.std == pytest.approx(math.sqrt(10), abs=1e-3)


def test_reverse_kl_settles_on_one_mode_which_is_its_global_minimum():
    narrow = kd.fit_gaussian("rkl")                    # from (1, 0.5): near the right mode
    broad = kd.fit_gaussian("rkl", start=(0.5, 3.0))   # from a broad start: over both modes
    assert narrow.mean == pytest.approx(3.0, abs=0.05) and narrow.std == pytest.approx(1.0, abs=0.05)
    assert abs(broad.mean) < 0.05 and broad.std > 2.5
    # one mode: about log 2 (the modes barely overlap), below the broad local optimum
    assert narrow.loss == pytest.approx(math.log(2), abs=0.01) and narrow.loss < broad.loss - 0.1


@pytest.mark.parametrize("name", losses.names())
def test_a_free_student_reaches_the_teacher_under_every_divergence(name):
    """Every divergence of the library is minimized at q = p: a student that can represent
    the teacher (free logits over 64 tokens, a Zipf-like teacher) ends within TV 1e-6 of it
    (tvd, whose gradient is a sign, the farthest: about 2e-7; the others 4e-10 or less)."""
    fit = kd.fit_discrete(name)
    assert fit.tv < 1e-6, (name, fit.tv)
    assert fit.head_error[-1] < fit.head_error[0] and fit.tail_error[-1] < fit.tail_error[0]


def test_a_capacity_limited_student_cannot_reach_the_teacher():
    fit = kd.fit_discrete("fkl", student="rank", rank=4, steps=300)
    assert fit.tv > 0.1 and len(fit.steps) == len(fit.head_error) == len(fit.tail_error)


def test_the_head_is_the_fewest_tokens_holding_the_mass():
    log_p = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05], dtype=torch.float64).log()
    assert kd.head_mask(log_p).tolist() == [False, True, False, False, False]  # 0.5 reaches half
    assert kd.head_mask(log_p, 0.7).tolist() == [False, True, False, True, False]
    assert kd.head_mask(log_p, 0.01).sum() == 1


# ---------------------------------------------------------------- the tied-tail student (closed-form optima)

def family_gradient(name: str, log_q: torch.Tensor, log_p: torch.Tensor, **params) -> torch.Tensor:
    """The divergence's gradient w.r.t. the tied-tail student's own weights (head logits, tail logit)."""
    basis = kd.student_basis("tied_tail", log_p)
    weights = torch.linalg.solve(basis.T @ basis, basis.T @ log_q).requires_grad_(True)
    losses.divergence(name, **params)((basis @ weights).unsqueeze(0), log_p.unsqueeze(0)).sum().backward()
    return weights.grad


def test_the_tied_tail_family_is_uniform_on_the_tail():
    log_p = kd.teacher_distribution()
    head = kd.head_mask(log_p)
    basis = kd.student_basis("tied_tail", log_p)
    assert basis.shape == (64, int(head.sum()) + 1)
    logits = basis @ torch.randn(basis.shape[1], dtype=torch.float64)
    assert logits[~head].unique().numel() == 1 and logits[head].unique().numel() == int(head.sum())


@pytest.mark.parametrize("alpha", [-0.5, 0.0, 0.3, 0.5, 1.0, 1.5])
def test_the_closed_form_is_a_stationary_point_of_the_library_divergence(alpha):
    """Independent of any fit: at :func:`tied_tail_optimum` the gradient of ``alpha`` (and of
    fkl/rkl at 1/0) on the family's weights vanishes, so q ∝ (p on the head, the order-alpha
    power mean on the tail) is the minimum (the problem is convex in q)."""
    log_p = kd.teacher_distribution()
    optimum = kd.tied_tail_optimum(alpha, log_p)
    assert family_gradient("alpha", optimum, log_p, alpha=alpha).abs().max() < 1e-12
    if alpha in (0.0, 1.0):
        name = "fkl" if alpha == 1.0 else "rkl"
        assert family_gradient(name, optimum, log_p).abs().max() < 1e-12
    # and it is not stationary at the other end's optimum (the test can fail)
    assert family_gradient("alpha", kd.tied_tail_optimum(alpha + 1.0, log_p), log_p, alpha=alpha).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_adam_on_the_tied_tail_student_reaches_the_closed_form(name):
    """From uniform, 500 Adam steps (lr 0.05 decayed by a cosine) land on the closed form to
    1e-9 in every probability and in the tail mass (measured: about 2e-11)."""
    log_p = kd.teacher_distribution()
    head = kd.head_mask(log_p)
    fit = kd.fit_discrete(name, log_p, student="tied_tail", steps=500, log_every=500)
    optimum = kd.tied_tail_optimum(1.0 if name == "fkl" else 0.0, log_p)
    assert (fit.log_q.exp() - optimum.exp()).abs().max() < 1e-9
    tail = log_p[~head]
    if name == "fkl":   # moment matching: the head exactly, the tail's total mass spread evenly
        assert fit.head_error[-1] < 1e-9 and fit.head_error[0] > 0.3
        assert fit.tail_mass == pytest.approx(float(tail.exp().sum()), abs=1e-9)
    else:               # each tail token ∝ the geometric mean; the minimum is -log(P_head + n * geomean)
        normalizer = float(log_p[head].exp().sum() + tail.numel() * tail.mean().exp())
        value = float(losses.divergence("rkl")(fit.log_q.unsqueeze(0), log_p.unsqueeze(0)))
        assert value == pytest.approx(-math.log(normalizer), abs=1e-12)
        assert fit.tail_mass == pytest.approx(tail.numel() * float(tail.mean().exp()) / normalizer, abs=1e-9)


def test_reverse_kl_puts_less_mass_on_the_tail_than_forward_kl():
    """Mode seeking on the family: n * geomean < n * mean (AM-GM, strict: the tail is not flat)."""
    log_p = kd.teacher_distribution()
    tail = ~kd.head_mask(log_p)
    fkl, rkl = (float(kd.tied_tail_optimum(a, log_p)[tail].exp().sum()) for a in (1.0, 0.0))
    assert fkl == pytest.approx(float(log_p[tail].exp().sum()), abs=1e-12)
    assert rkl < fkl - 0.05   # 0.409 vs 0.468 on the default teacher


# ---------------------------------------------------------------- head first or tail first (Wu et al., 2025)

@pytest.mark.parametrize("optimizer, lr", [("adam", 0.05), ("sgd", 2.0)])
def test_the_head_tail_race_measures_both_parts_and_both_fits_converge(optimizer, lr):
    """Only what must hold: the early errors have fallen on both parts, for both divergences, and
    both free students end at the teacher. Which one leads is measured, not asserted."""
    race = kd.head_tail_race(step=10, lr=lr, optimizer=optimizer, steps=1000)
    assert set(race.head) == set(race.tail) == set(race.tv) == {"fkl", "rkl"}
    assert all(0 < r < 1 for r in (*race.head.values(), *race.tail.values())), race
    assert max(race.tv.values()) < 0.01, race.tv
    assert race.fkl_head_and_rkl_tail_ahead() in (True, False) and race.each_fits_its_part_first() in (True, False)


# ---------------------------------------------------------------- alpha and beta: gradients and fitted mass

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
AB_GRID = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.5), (1.0, -0.5))


@pytest.fixture(scope="module")
def family() -> dict[str, kd.FamilyPoint]:
    return {p.label: p for p in kd.mass_and_gradients(alphas=ALPHAS, ab_grid=AB_GRID, steps=400)}


def test_every_divergence_pushes_the_imperfect_student_without_moving_the_normalizer(family):
    """Each loss is a function of softmax(logits): its gradient sums to 0 over the vocabulary; the
    student is wrong, so the gradient is not 0; it pushes the head up (the smoothed student is
    short of mass there)."""
    assert len(family) == len(losses.names()) + len(ALPHAS) + len(AB_GRID)
    for label, point in family.items():
        assert abs(float(point.gradient.sum())) < 1e-12 * max(1.0, float(point.gradient.abs().sum())), label
        assert point.gradient.abs().sum() > 1e-3 and 0 < point.head_share < 1, label
        top = int(kd.teacher_distribution().argmax())
        assert point.gradient[top] < 0, label


def test_ab_reduces_to_the_kl_directions_and_to_alpha(family):
    """Cichocki, Cruces & Amari (Entropy 2011): (1, 0) is fkl, (0, 1) rkl, and alpha + beta = 1 the
    alpha-divergence; the gradients agree token by token, the fitted students too."""
    for ab, other in [("ab alpha=1 beta=0", "fkl"), ("ab alpha=0 beta=1", "rkl"),
                      ("ab alpha=0.5 beta=0.5", "alpha alpha=0.5")]:
        assert torch.allclose(family[ab].gradient, family[other].gradient, rtol=0, atol=1e-12), ab
        assert family[ab].tail_mass == pytest.approx(family[other].tail_mass, abs=1e-9)
        assert family[ab].tail_mass == pytest.approx(family[ab].exact_tail_mass, abs=1e-9)


def test_the_alpha_divergence_tail_mass_rises_with_alpha_from_rkl_to_fkl(family):
    """The Adam fits agree with :func:`tied_tail_optimum` (1e-9; measured: 4e-11 or less) and rise
    strictly with alpha, from the reverse-KL optimum (alpha = 0) to the forward-KL one (1)."""
    fitted = [family[f"alpha alpha={a:g}"] for a in ALPHAS]
    for point in fitted:
        assert point.tail_mass == pytest.approx(point.exact_tail_mass, abs=1e-9), point.label
    masses = [p.tail_mass for p in fitted]
    assert all(a < b for a, b in zip(masses, masses[1:], strict=False)), masses
    assert masses[0] == pytest.approx(family["rkl"].exact_tail_mass, abs=1e-9)
    assert masses[-1] == pytest.approx(family["fkl"].exact_tail_mass, abs=1e-9)


def test_at_alpha_one_beta_does_not_move_the_tied_tail_optimum(family):
    """On the family ab sees the tail through its arithmetic mean at alpha = 1, and that target is
    normalized and in the family: the optimum is forward KL's for every beta."""
    for beta in (0.5, -0.5):
        point = family[f"ab alpha=1 beta={beta:g}"]
        assert point.tail_mass == pytest.approx(family["fkl"].exact_tail_mass, abs=1e-9)
        assert point.entropy == pytest.approx(family["fkl"].entropy, abs=1e-9)


def test_the_family_plot_is_written(family, tmp_path):
    pytest.importorskip("matplotlib")
    kd.plot_divergence_family(tmp_path / "family.png", list(family.values()))
    assert (tmp_path / "family.png").stat().st_size > 10_000
