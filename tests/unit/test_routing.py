"""MoE routing analysis on a hand-built router: every number is computed by hand here.

``RouterLM`` is a bigram model whose router logits, per layer, are a fixed row of a table
picked by the current token, so which experts are chosen at each position is known exactly.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdexp import analyze as an
from kdexp.data.encode import Example
from kdexp.evaluation import analysis as est
from kdexp.models import router_probs

PAD = 5


class RouterLM(torch.nn.Module):
    """Next-token logits from a table; each layer's router logits from its own table, both
    picked by the current token, as Hugging Face MoE models return them ([B * T, E] per layer)."""

    def __init__(self, routers: list[torch.Tensor], vocab: int = 6):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab), requires_grad=False)
        self.routers = [r.float() for r in routers]
        self.config = SimpleNamespace(num_local_experts=routers[0].shape[1], num_experts_per_tok=2)

    def forward(self, input_ids, attention_mask=None, output_router_logits=False, **_):
        routers = tuple(r[input_ids].reshape(-1, r.shape[1]) for r in self.routers) if output_router_logits else None
        return SimpleNamespace(logits=self.table[input_ids], router_logits=routers)


# 4 experts; the top 2 of each token's row:   token 0: {0, 1}, 1: {0, 1}, 2: {1, 2}, 3: {2, 3}
LAYER0 = torch.tensor([[4., 3, 1, 0], [3, 4, 0, 1], [0, 4, 3, 1], [0, 1, 3, 4], [1, 1, 1, 1], [1, 1, 1, 1]])
# another layer:                              token 0: {2, 3}, 1: {0, 3}, 2: {0, 3}, 3: {0, 1}
LAYER1 = torch.tensor([[0., 1, 4, 3], [4, 0, 1, 3], [3, 0, 1, 4], [4, 3, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]])


def ex(prompt: list[int], response: list[int]) -> Example:
    return Example(prompt, response, {"references": []})


def test_expert_overlap_counts_shared_experts_in_any_order():
    a = torch.tensor([0, 1])
    assert est.expert_overlap(a, a) == 1.0
    assert est.expert_overlap(a, torch.tensor([1, 0])) == 1.0  # same set, other order
    assert est.expert_overlap(a, torch.tensor([1, 2])) == 0.5
    assert est.expert_overlap(a, torch.tensor([2, 3])) == 0.0
    batch = torch.tensor([[0, 1], [2, 3]])
    assert est.expert_overlap(batch, batch.flip(0)).tolist() == [0.0, 0.0]
    assert est.expert_overlap(torch.tensor([[3]]), torch.tensor([[3]])).tolist() == [1.0]  # k = 1


def test_router_entropy_and_load():
    assert float(est.routing_entropy(torch.full((4,), 0.25))) == pytest.approx(math.log(4))
    assert float(est.routing_entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0  # 0 log 0 = 0
    p = torch.tensor([0.7, 0.2, 0.1])
    assert float(est.routing_entropy(p)) == pytest.approx(-(p * p.log()).sum().item())
    load = est.expert_load(torch.tensor([[0, 1], [1, 0], [1, 2], [2, 3]]), 4)  # 8 assignments
    assert load.tolist() == pytest.approx([2 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert math.isnan(float(est.expert_load(torch.zeros(0, 2, dtype=torch.long), 4)[0]))


def test_router_probabilities_of_each_scoring_function():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.allclose(router_probs(logits, "softmax"), torch.softmax(logits.double(), -1))
    s = torch.sigmoid(logits.double())
    assert torch.allclose(router_probs(logits, "sigmoid"), s / s.sum())  # DeepSeek-V3's normalized affinities
    s = torch.nn.functional.softplus(logits.double()).sqrt()
    assert torch.allclose(router_probs(logits, "sqrtsoftplus"), s / s.sum())  # DeepSeek-V4's scoring_func
    assert float(router_probs(logits, "sigmoid").sum()) == pytest.approx(1.0)


def test_identical_prefixes_agree_fully():
    model = RouterLM([LAYER0, LAYER1])
    refs = [ex([0], [1, 2, 3]), ex([2, 0], [3, 3])]
    out = an.routing(model, refs, [refs, refs], PAD, 8)
    assert out["agreement"] == [1.0, 1.0]
    assert all(m == 1.0 for s in out["per_step"] for m in s["mean"])
    assert out["tokens"] == 2 * (3 + 2)


def test_agreement_entropy_and_load_on_a_hand_built_router():
    model = RouterLM([LAYER0, LAYER1])
    # The router at the position predicting response token t reads the token before it:
    #   reference: 0 | 1 2 1  -> routers of tokens 0, 1, 2;   own: 0 | 2 2 3 -> tokens 0, 2, 2.
    ref, own = ex([0], [1, 2, 1]), ex([0], [2, 2, 3])
    out = an.routing(model, [ref], [[own]], PAD, 8)
    # layer 0: step 1 same token; step 2: {0,1} vs {1,2} -> 1/2; step 3: tokens 2 and 2 -> 1
    # layer 1: step 2: {0,3} vs {0,3} -> 1;                   step 3: 1
    assert out["per_step"][0]["mean"] == pytest.approx([1.0, 0.5, 1.0])
    assert out["per_step"][1]["mean"] == pytest.approx([1.0, 1.0, 1.0])
    assert out["agreement"] == pytest.approx([2.5 / 3, 1.0])
    assert out["layers"] == 2 and out["experts"] == 4 and out["top_k"] == 2
    # no router module to read (a table): the top k of the softmax, said so
    assert out["chosen"] == "top-k" and out["scoring"] == "softmax"
    # entropy: the mean over the three positions of each kind
    h = est.routing_entropy(torch.softmax(LAYER0.double(), -1))
    assert out["entropy"]["teacher_forced"][0] == pytest.approx(float(h[[0, 1, 2]].mean()))
    assert out["entropy"]["free_running"][0] == pytest.approx(float(h[[0, 2, 2]].mean()))
    # load on own prefixes, layer 0: tokens 0, 2, 2 -> {0,1} {1,2} {1,2}
    assert out["load"]["free_running"][0] == pytest.approx([1 / 6, 3 / 6, 2 / 6, 0.0])
    # responses of different lengths: steps both reach only
    out = an.routing(model, [ref], [[ex([0], [2])]], PAD, 8)
    assert out["per_step"][0]["mean"] == [1.0]


def test_a_model_without_a_router_is_refused():
    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 6))

    with pytest.raises(an.UserError, match="mixture-of-experts"):
        an.routing(Dense(), [ex([0], [1])], [[ex([0], [1])]], PAD, 8)
