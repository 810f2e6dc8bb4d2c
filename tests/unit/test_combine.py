"""Several teachers' distributions combined (kdexp.teachers.combine), against independent
float64 formulas written element by element on hand-built distributions."""

from __future__ import annotations

import math

import pytest
import torch

from kdexp.teachers import combine

pytestmark = pytest.mark.unit


def dists(n: int, shape=(2, 3, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).mul(2).log_softmax(-1) for _ in range(n)]


def test_mixture_is_the_weighted_average_of_the_probabilities():
    a, b, c = dists(3)
    got = combine.mixture([a, b, c], [1.0, 2.0, 1.0])
    for i in range(2):
        for j in range(3):
            for v in range(5):
                want = (a[i, j, v].exp() + 2 * b[i, j, v].exp() + c[i, j, v].exp()) / 4
                assert math.isclose(got[i, j, v].exp().item(), want.item(), rel_tol=1e-12)
    assert torch.allclose(got.exp().sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert torch.allclose(combine.mixture([a, b], [1.0, 0.0]), a)  # a zero weight drops a teacher
    assert torch.allclose(combine.mixture([a, a], [0.3, 0.7]), a)  # identical teachers: themselves


def test_relative_corrects_the_finetuned_teacher_by_the_raw_models_ratio():
    ft, t_raw, s_raw = dists(3, seed=1)
    got = combine.relative(ft, t_raw, s_raw, alpha=0.5)
    for i in range(2):
        for j in range(3):
            score = [ft[i, j, v].exp() * (s_raw[i, j, v].exp() / t_raw[i, j, v].exp()) ** 0.5 for v in range(5)]
            z = sum(score)
            for v in range(5):
                assert math.isclose(got[i, j, v].exp().item(), (score[v] / z).item(), rel_tol=1e-12)
    assert torch.allclose(combine.relative(ft, t_raw, s_raw, alpha=0.0), ft)
    assert torch.allclose(combine.relative(ft, t_raw, t_raw, alpha=2.0), ft)  # raw student == raw teacher


def test_route_gives_each_sequence_its_own_teachers_distribution():
    a, b, c = dists(3, shape=(4, 3, 5), seed=2)
    index = torch.tensor([2, 0, 1, 2])
    got = combine.route([a, b, c], index)
    for row, t in enumerate(index.tolist()):
        assert torch.equal(got[row], [a, b, c][t][row])
    with pytest.raises(ValueError, match="routed to teacher 3, but there are 3"):
        combine.route([a, b, c], torch.tensor([0, 3, 1, 1]))


def test_weights_must_be_a_distribution_over_the_teachers():
    a, b = dists(2)
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        combine.mixture([a, b, a], [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0 with a positive sum"):
        combine.mixture([a, b], [1.0, -1.0])


def test_gradients_flow_through_each_rule():
    """The rules are differentiable (an online teacher, or a test of the loss through them)."""
    a, b, c = (x.clone().requires_grad_() for x in dists(3, seed=3))
    assert torch.autograd.gradcheck(lambda x, y: combine.mixture([x.log_softmax(-1), y.log_softmax(-1)], [0.3, 0.7]),
                                    (a, b))
    assert torch.autograd.gradcheck(lambda x, y, z: combine.relative(x, y, z, 0.7), (a, b, c))
