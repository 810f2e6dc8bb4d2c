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


class Fixed(torch.nn.Module):
    """A stand-in model whose logits are a fixed [T, V] table for every sequence."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float())

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table.expand(input_ids.shape[0], -1, -1))


def test_the_multi_teacher_combines_its_own_distinct_models_by_each_rule():
    """Two different teachers and a raw student: the rule's target is the right function of the
    right models (weights, the fine-tuned / raw order, each example's routed teacher)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from kdexp.teachers.multi import MultiTeacher

    g = torch.Generator().manual_seed(4)
    a, b, s = (torch.randn(3, 7, generator=g) * 2 for _ in range(3))
    acc = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    la, lb, ls = (x.log_softmax(-1) for x in (a, b, s))

    mix = MultiTeacher(acc, None, ["A", "B"], [Fixed(a), Fixed(b)], "mixture", weights=[1.0, 0.0])
    torch.testing.assert_close(mix.distributions(batch)[0], la)
    mix.weights = [0.25, 0.75]
    torch.testing.assert_close(mix.distributions(batch)[1], combine.mixture([la, lb], [0.25, 0.75]))
    rel = MultiTeacher(acc, None, ["A", "B"], [Fixed(a), Fixed(b)], "relative", alpha=0.6, raw_student=Fixed(s))
    torch.testing.assert_close(rel.distributions(batch)[0], combine.relative(la, lb, ls, 0.6))
    route = MultiTeacher(acc, None, ["A", "B"], [Fixed(a), Fixed(b)], "route",
                         route={"key": "level", "map": {"1": "B", "2": "A"}})
    examples = [SimpleNamespace(record={"level": 1}), SimpleNamespace(record={"level": 2})]
    got = route.distributions({**batch, **route.inputs(examples)})
    torch.testing.assert_close(got[0], lb)
    torch.testing.assert_close(got[1], la)


def test_a_token_a_model_rules_out_stays_out_of_the_relative_target():
    ft = torch.tensor([[0.0, -1.0, -2.0]]).log_softmax(-1)
    raw_t = torch.tensor([[0.0, -1.0, float("-inf")]])
    raw_s = torch.tensor([[0.0, -1.0, float("-inf")]])
    got = combine.relative(ft, raw_t, raw_s, 1.0)
    assert torch.isfinite(got).all() and torch.allclose(got.exp().sum(-1), torch.ones(1))
