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
    the teacher (free logits over 64 tokens, a Zipf-like teacher) ends within TV 0.01 of it
    (tvd, whose gradient is a sign, the farthest: about 0.003)."""
    fit = kd.fit_discrete(name)
    assert fit.tv < 0.01, (name, fit.tv)
    assert fit.head_error[-1] < fit.head_error[0] and fit.tail_error[-1] < fit.tail_error[0]


def test_a_capacity_limited_student_cannot_reach_the_teacher():
    fit = kd.fit_discrete("fkl", rank=4, steps=300)
    assert fit.tv > 0.1 and len(fit.steps) == len(fit.head_error) == len(fit.tail_error)


def test_the_head_is_the_fewest_tokens_holding_the_mass():
    log_p = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05], dtype=torch.float64).log()
    assert kd.head_mask(log_p).tolist() == [False, True, False, False, False]  # 0.5 reaches half
    assert kd.head_mask(log_p, 0.7).tolist() == [False, True, False, True, False]
    assert kd.head_mask(log_p, 0.01).sum() == 1
