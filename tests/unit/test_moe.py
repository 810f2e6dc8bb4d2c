"""Mixture-of-experts students on tiny random Hugging Face models (Mixtral, Qwen2-MoE and
DeepSeek-V3): the router's shape, the load-balancing term's hooks, and the routing the analysis
reads (the experts the routers chose, checked against the papers' routing rules)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from kdexp import analyze as an
from kdexp.data.encode import Example
from kdexp.errors import UserError
from kdexp.models import RouterLoss, route, router_shape, scoring_of

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


def test_lora_on_an_moe_student_takes_the_architectures_default_targets():
    """``student.lora.target_modules: null`` on a Mixtral student: PEFT's default for the
    architecture (q_proj, v_proj), which PEFT itself loses for Mixtral under transformers 5."""
    from kdexp.models import add_lora

    model = add_lora(mixtral(), {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None})
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)  # only the adapters train
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}


def test_the_weight_is_refused_where_it_has_no_meaning():
    dense = torch.nn.Linear(2, 2)
    dense.config = type("Config", (), {})()
    assert RouterLoss.attach(dense, "auto") is None
    with pytest.raises(UserError, match="not a mixture of experts"):
        RouterLoss.attach(dense, 0.01)
    with pytest.raises(UserError, match="set train.router_aux_weight=0"):
        RouterLoss.attach(mixtral(), "auto", sample_weight="teacher_likelihood")


def qwen3_moe() -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, intermediate_size=16, moe_intermediate_size=16, num_experts=6,
                                              decoder_sparse_step=1, head_dim=16))


def olmoe() -> torch.nn.Module:
    torch.manual_seed(0)
    return OlmoeForCausalLM(OlmoeConfig(**SMALL, intermediate_size=16, num_experts=8))


MLA = {"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}


def deepseek_v2() -> torch.nn.Module:
    """DeepSeek-V2: softmax, group-limited greedy (the best 2 of 4 groups by their best expert), 3 per token."""
    torch.manual_seed(0)
    config = DeepseekV2Config(**{**SMALL, "num_hidden_layers": 3, "num_experts_per_tok": 3}, **MLA,
                              intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                              topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1)
    model = DeepseekV2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1)  # routers that prefer some experts: the group limit then binds
    return model


def deepseek(bias: bool = True, vocab: int = 64) -> torch.nn.Module:
    """DeepSeek-V3: sigmoid affinities, a bias added before the choice, group-limited top-k
    (8 experts in 4 groups, the best 2 groups kept), a dense first layer and a shared expert."""
    torch.manual_seed(0)
    config = DeepseekV3Config(**{**SMALL, "num_hidden_layers": 3, "vocab_size": vocab}, intermediate_size=32,
                              moe_intermediate_size=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                              n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                              first_k_dense_replace=1, **MLA)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.weight.normal_(0, 1)
                if bias:  # the balancing bias as training leaves it: it moves the choice
                    m.e_score_correction_bias.copy_(torch.tensor([0.0, 0.6, -0.4, 0.2, 0.5, -0.6, 0.1, 0.3]))
    return model.eval()


def deepseek_choice(h: torch.Tensor, router: torch.nn.Module) -> torch.Tensor:
    """The experts DeepSeek-V3 sends each token to (DeepSeek-AI, "DeepSeek-V3 Technical Report",
    2024, Eqs. 15-16, and the ``Gate`` of its official inference code): affinities
    s = sigmoid(u e_i); the choice ranks s + b; a group's score is the sum of its 2 best ranked
    experts (the code's fixed 2; the paper's node-limited routing sums the best K_r / M, which is
    2 in the released model); only the best ``topk_group`` groups' experts can be chosen.
    [N, H] -> [N, k]"""
    s = torch.sigmoid(h.float() @ router.weight.float().T)
    ranked = s + router.e_score_correction_bias
    n, e = ranked.shape
    groups = ranked.view(n, router.num_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, groups]
    kept = torch.zeros_like(groups).scatter(1, groups.topk(router.topk_group, dim=-1).indices, 1.0)
    allowed = kept.repeat_interleave(e // router.num_group, dim=1).bool()
    return ranked.masked_fill(~allowed, float("-inf")).topk(router.top_k, dim=-1).indices


def as_sets(chosen: torch.Tensor) -> torch.Tensor:
    return chosen.sort(-1).values


@pytest.mark.parametrize("build", [mixtral, qwen_moe])
def test_softmax_routers_choose_the_top_k_of_their_logits(build):
    model = build().eval()
    ids = torch.randint(0, 64, (2, 7))
    got = route(model, ids, torch.ones_like(ids))
    assert got.read and got.scoring == "softmax"  # read from the routers themselves
    with torch.no_grad():
        logits = torch.stack(model(input_ids=ids, output_router_logits=True).router_logits).reshape(*got.probs.shape)
    assert torch.allclose(got.probs, torch.softmax(logits.double(), -1).float(), atol=1e-6)
    assert torch.equal(as_sets(got.chosen), as_sets(logits.topk(2, dim=-1).indices))


MODELS = [mixtral, qwen_moe, qwen3_moe, olmoe, deepseek_v2, deepseek]


@pytest.mark.parametrize("build", MODELS)
def test_the_experts_read_are_those_the_experts_receive(build):
    """What the routers' outputs say against what the expert modules are given (their
    ``top_k_index`` argument), for every router family: softmax top-k, group-limited greedy,
    sigmoid with a bias and groups."""
    model = build().eval()
    given: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, args, out: given.append(args[1]))
               for m in model.modules() if type(m).__name__.endswith("Experts")]
    ids = torch.randint(0, 64, (8, 16))
    got = route(model, ids, torch.ones_like(ids))
    for h in handles:
        h.remove()
    assert handles and got.read
    assert torch.equal(as_sets(got.chosen), as_sets(torch.stack(given).reshape(got.chosen.shape)))
    assert got.scoring == ("sigmoid" if build is deepseek else "softmax")  # told by the routers' own weights
    if build in (deepseek_v2, deepseek):  # the top k of the logits is another choice (seen: 61 % and 75 %)
        naive = got.probs.topk(got.chosen.shape[-1], dim=-1).indices
        assert (as_sets(naive) != as_sets(got.chosen)).any(-1).float().mean() > 0.3


def test_the_scoring_function_is_told_by_the_weights_of_the_chosen_experts():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 1.2, -0.7, 2.2]])
    chosen = logits.topk(2, dim=-1).indices
    soft = torch.softmax(logits, -1).gather(-1, chosen)
    assert scoring_of(logits, chosen, soft) == "softmax"
    assert scoring_of(logits, chosen, soft / soft.sum(-1, keepdim=True)) == "softmax"  # renormalized (Mixtral)
    sig = torch.sigmoid(logits).gather(-1, chosen)
    assert scoring_of(logits, chosen, 2.5 * sig / sig.sum(-1, keepdim=True)) == "sigmoid"  # DeepSeek-V3's scale
    assert scoring_of(logits, chosen, torch.tensor([[0.5, 0.5], [0.9, 0.1]])) is None  # neither
    assert scoring_of(logits, chosen[:, :1], soft[:, :1]) is None  # one expert: no ratio to read
    low = logits - 30  # sigmoid(x) ~ e^x far below 0: either fits, neither is said
    assert scoring_of(low, chosen, torch.sigmoid(low.double()).gather(-1, chosen)) is None


def test_deepseek_routers_are_read_not_recomputed_from_their_logits():
    model = deepseek()
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    inputs: list[torch.Tensor] = []
    handles = [r.register_forward_hook(lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
               for r in routers]
    ids = torch.randint(0, 64, (3, 9))
    got = route(model, ids, torch.ones_like(ids))
    for h in handles:
        h.remove()
    assert router_shape(model) == (8, 2) and got.read and got.scoring == "sigmoid"
    assert got.chosen.shape == (2, 3, 9, 2)  # the two MoE layers (the first is dense)
    expected = torch.stack([deepseek_choice(h, r) for h, r in zip(inputs, routers, strict=True)]).reshape(2, 3, 9, 2)
    assert torch.equal(as_sets(got.chosen), as_sets(expected))
    # the top k of the logits is another choice at many positions: reading the router matters
    naive = got.probs.topk(2, dim=-1).indices
    assert (as_sets(naive) != as_sets(got.chosen)).any(-1).float().mean() > 0.3
    # normalized sigmoid affinities (DeepSeek-V3's sequence-wise balance loss, Eq. 19)
    s = torch.sigmoid(torch.stack([h.double() @ r.weight.double().T for h, r in zip(inputs, routers, strict=True)]))
    assert torch.allclose(got.probs.double(), (s / s.sum(-1, keepdim=True)).reshape(got.probs.shape), atol=1e-6)


def test_a_deepseek_student_asked_for_a_load_balancing_loss_is_told_it_has_none():
    model = deepseek().train()
    assert RouterLoss.attach(model, "auto") is None  # no router_aux_loss_coef: nothing to add
    term = RouterLoss.attach(model, 0.01)
    ids = torch.randint(0, 64, (2, 5))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    with pytest.raises(UserError, match="set train.router_aux_weight=0"):
        term.take()


@pytest.mark.parametrize("build", MODELS)
def test_the_routing_of_a_padded_batch_is_each_examples_own(build):
    """The analysis reshapes each layer's [B * T, ...] routing to [B, T, ...]: a batch of
    responses of different lengths gives every example the routing it has alone."""
    model = build().eval()
    examples = [Example([1, 2, 3], [4, 5, 6, 7], {}), Example([8, 9], [10], {})]
    together = an.routed(model, examples, 0, 8)
    alone = [an.routed(model, [e], 0, 8) for e in examples]
    assert together.read and all(a.read for a in alone)
    for i, a in enumerate(alone):
        assert together.probs[i].shape == a.probs[0].shape and torch.allclose(together.probs[i], a.probs[0], atol=1e-5)
        assert torch.equal(as_sets(together.chosen[i]), as_sets(a.chosen[0]))
    experts, k = router_shape(model)
    assert together.probs[0].shape == (2, 4, experts) and together.chosen[0].shape == (2, 4, k)  # [L, n, ...]
