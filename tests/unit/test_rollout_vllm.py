"""rollout.engine=vllm, everything around the engine: its sampling parameters, the scoring of
its tokens by the trained model, the weight-sync schedule and the choice of sampler.

vLLM itself needs a GPU and is not installed here: the engine is a stand-in with vLLM's
interface (``LLM(model=DIR, ...)``, ``generate``, ``apply_model``, ``reset_prefix_cache``) that
loads the directory kdexp writes and samples with kdexp's own decoder. These tests check kdexp's
side of the contract, not vLLM.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdexp.rollout import RolloutSpec, sample, score
from kdexp.rollout_vllm import VllmRollouts, sampling_params


class StandIn:
    """vLLM's ``LLM`` as kdexp uses it."""

    made: list[StandIn] = []

    def __init__(self, model: str, seed: int, **options):
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()  # the directory kdexp wrote
        self.options, self.calls, self.resets = options, [], 0
        StandIn.made.append(self)

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(params)
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            kw = p.kwargs
            spec = RolloutSpec(do_sample=kw["temperature"] > 0, temperature=kw["temperature"] or 1.0,
                               top_p=kw["top_p"], top_k=max(kw["top_k"], 0), max_new_tokens=kw["max_tokens"],
                               stop_ids=tuple(kw["stop_token_ids"]))
            s = sample(self.model, [prompt["prompt_token_ids"]], spec, kw["stop_token_ids"][0], 0,
                       torch.Generator().manual_seed(kw["seed"]))[0]
            out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(s.response_ids))]))
        return out

    def apply_model(self, func):
        return [func(self)]

    def load_weights(self, weights):
        self.model.load_state_dict(dict(weights))

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = StandIn
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    StandIn.made = []
    return StandIn


def test_sampling_params_follow_the_rollout_spec():
    spec = RolloutSpec(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=33, stop_ids=(5,))
    p = sampling_params(spec, [2, 5, 2], seed=7, vocab=10)
    assert (p["temperature"], p["top_p"], p["top_k"], p["max_tokens"], p["seed"]) == (0.7, 0.9, 20, 33, 7)
    assert p["stop_token_ids"] == [2, 5] and p["allowed_token_ids"] == list(range(10)) and not p["ignore_eos"]
    greedy = sampling_params(RolloutSpec(do_sample=False, top_p=0.5, top_k=3), [2], seed=1, vocab=None)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)  # greedy: no cuts
    assert "allowed_token_ids" not in greedy
    assert sampling_params(RolloutSpec(top_k=0), [2], 1, None)["top_k"] == -1  # 0 (off) is vLLM's -1


def test_scores_of_tokens_sampled_elsewhere_are_the_samplers_own(ctx):
    """``score`` on the HF sampler's own tokens gives back its log-probabilities (tempered and
    cut, and the student's), and cuts a response after its first stop token."""
    model, eos = ctx.student.eval(), ctx.tokenizer.eos_token_id
    prompts = [e.prompt_ids for e in ctx.train[:4]]
    spec = RolloutSpec(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=10)
    ref = sample(model, prompts, spec, eos, ctx.tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    got = score(model, prompts, [r.response_ids for r in ref], spec, eos, ctx.tokenizer.pad_token_id)
    for r, g in zip(ref, got, strict=True):
        assert g.response_ids == r.response_ids
        assert g.logp_sampler == pytest.approx(r.logp_sampler, abs=1e-4)
        assert g.logp_student == pytest.approx(r.logp_student, abs=1e-4)
    stopped = score(model, prompts[:2], [[7, eos, 9, 9], []], spec, eos, ctx.tokenizer.pad_token_id)
    assert [s.response_ids for s in stopped] == [[7, eos], []]


def test_the_engine_samples_student_rollouts_and_loads_new_weights_every_sync_every_steps(ctx, fake_vllm):
    ctx.cfg.rollout.engine, ctx.cfg.rollout.sync_every = "vllm", 2
    ctx.vllm = VllmRollouts(ctx.cfg, ctx.tokenizer, None)
    examples = ctx.train[:3]
    first = ctx.rollout(examples, "k", 0)
    [engine] = fake_vllm.made  # made once, from the student as it is
    params = [p.kwargs for p in engine.calls[0]]
    assert len({p["seed"] for p in params}) == 3  # one seed per prompt
    assert params[0]["temperature"] == ctx.spec.temperature and params[0]["max_tokens"] == ctx.spec.max_new_tokens
    with torch.no_grad():  # the methods' log-probabilities are the trained model's on the engine's tokens
        ref = score(ctx.student, [e.prompt_ids for e in examples], [e.response_ids for e in first], ctx.spec,
                    ctx.tokenizer.eos_token_id, ctx.tokenizer.pad_token_id)
    for e, r in zip(first, ref, strict=True):
        assert e.values["logq_old"] == pytest.approx(r.logp_student, abs=1e-5)
    assert ctx.rollout(examples, "k", 0) == first  # the same key: the same seeds, the same samples

    before = copy.deepcopy(ctx.student.state_dict())
    with torch.no_grad():
        next(ctx.student.parameters()).add_(0.5)  # an optimizer step
    loaded = lambda: all(torch.equal(v, engine.model.state_dict()[k]) for k, v in ctx.student.state_dict().items())  # noqa: E731
    ctx.step = 1
    ctx.rollout(examples, "k", 1)
    assert not loaded() and all(torch.equal(v, engine.model.state_dict()[k]) for k, v in before.items())
    ctx.step = 2
    ctx.rollout(examples, "k", 2)
    assert loaded() and engine.resets == 1 and ctx.vllm.syncs == 1 and len(fake_vllm.made) == 1
    with torch.no_grad():
        next(ctx.student.parameters()).sub_(0.5)


def test_teacher_samples_and_teacher_mixes_stay_on_the_hf_sampler(ctx, fake_vllm):
    ctx.cfg.rollout.engine = "vllm"
    ctx.vllm = VllmRollouts(ctx.cfg, ctx.tokenizer, None)
    ctx.rollout(ctx.train[:2], "t", model="teacher")
    ctx.rollout(ctx.train[:2], "m", teacher_mix=0.2)
    assert fake_vllm.made == []
