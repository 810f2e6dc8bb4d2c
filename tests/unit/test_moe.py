"""Mixture-of-experts students on tiny random Hugging Face models (Mixtral and Qwen2-MoE): the
router's shape, the load-balancing term's hooks, and the router logits the routing analysis reads."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from kdexp import analyze as an
from kdexp.data.encode import Example
from kdexp.errors import UserError
from kdexp.models import RouterLoss, router_shape

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2}


def mixtral() -> torch.nn.Module:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SMALL, intermediate_size=16, num_local_experts=4,
                                            router_aux_loss_coef=0.02))


def qwen_moe() -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**SMALL, intermediate_size=16, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=16, num_experts=6,
                                              decoder_sparse_step=1, router_aux_loss_coef=0.03))


@pytest.mark.parametrize(("build", "shape", "weight"), [(mixtral, (4, 2), 0.02), (qwen_moe, (6, 2), 0.03)])
def test_the_load_balancing_term_is_the_models_own_aux_loss(build, shape, weight):
    model = build()
    assert router_shape(model) == shape
    term = RouterLoss.attach(model, "auto")
    assert term is not None and term.weight == pytest.approx(weight)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: left out of the statistic
    model(input_ids=ids, attention_mask=mask)  # a training forward: the hook asks for the router logits
    value = term.take()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert float(value.detach()) == pytest.approx(float(expected)) and value.requires_grad
    value.backward()  # the routers learn from it
    gates = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]  # the routers
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    with torch.no_grad():  # generation and evaluation: nothing asked, nothing kept
        model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    with pytest.raises(RuntimeError, match="no load-balancing loss"):
        term.take()
    assert RouterLoss.attach(model, 0) is None


def test_the_weight_is_refused_where_it_has_no_meaning():
    dense = torch.nn.Linear(2, 2)
    dense.config = type("Config", (), {})()
    assert RouterLoss.attach(dense, "auto") is None
    with pytest.raises(UserError, match="not a mixture of experts"):
        RouterLoss.attach(dense, 0.01)
    with pytest.raises(UserError, match="set train.router_aux_weight=0"):
        RouterLoss.attach(mixtral(), "auto", sample_weight="teacher_likelihood")


@pytest.mark.parametrize("build", [mixtral, qwen_moe])
def test_router_logits_of_a_padded_batch_are_each_examples_own(build):
    """The analysis reshapes each layer's [B * T, E] router logits to [B, T, E]: a batch of
    responses of different lengths gives every example the routers it has alone."""
    model = build().eval()
    examples = [Example([1, 2, 3], [4, 5, 6, 7], {}), Example([8, 9], [10], {})]
    together = an.routed(model, examples, 0, 8)
    alone = [an.routed(model, [e], 0, 8)[0] for e in examples]
    for t, a in zip(together, alone, strict=True):
        assert t.shape == a.shape and torch.allclose(t, a, atol=1e-5)
    assert together[0].shape == (2, 4, router_shape(model)[0])  # [L, response tokens, E]
