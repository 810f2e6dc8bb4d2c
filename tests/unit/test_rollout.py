"""Batched generation: left padding is exact, sampling is seeded per batch, EOS ends a response."""

from __future__ import annotations

import math

import pytest
import torch

from kdexp.data.encode import Example
from kdexp.models import asset_path, load_model
from kdexp.rollout import GenerationSpec, generate

PROMPTS = ["### Instruction:\nDescribe Alice.\n\n### Response:\n",
           "### Instruction:\nList these words in reverse order.\n\n### Input:\ncat, dog, lamp, pear\n\n### Response:\n",
           "### Instruction:\nWhat is two plus two?\n\n### Response:\n"]


@pytest.fixture(scope="module")
def model_and_tok():
    torch.manual_seed(0)
    spec = {"name_or_path": asset_path("tiny-student"), "init": "random", "dtype": "float32",
            "lora": {"enabled": False}}
    return load_model(spec)


def examples(tok):
    return [Example(tok(p)["input_ids"], [], {"prompt": p, "references": ["x"]}) for p in PROMPTS]


def test_left_padded_batch_equals_one_by_one(model_and_tok):
    model, tok = model_and_tok
    exs = examples(tok)
    assert len({len(e.prompt_ids) for e in exs}) == 3  # really different lengths
    spec = GenerationSpec(do_sample=False, max_new_tokens=12)
    batched, lengths = generate(model, tok, exs, spec, seed=0, batch_size=3)
    alone = [generate(model, tok, [e], spec, seed=0, batch_size=1)[0][0] for e in exs]
    assert batched == alone
    assert all(0 <= n <= 12 for n in lengths)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model_and_tok):
    model, tok = model_and_tok
    exs = examples(tok) * 4
    spec = GenerationSpec(do_sample=True, temperature=1.5, max_new_tokens=10)
    state = torch.get_rng_state()
    a, _ = generate(model, tok, exs, spec, seed=10, batch_size=4)
    assert torch.equal(state, torch.get_rng_state())
    b, _ = generate(model, tok, exs, spec, seed=10, batch_size=4)
    c, _ = generate(model, tok, exs, spec, seed=20, batch_size=4)
    assert a == b and a != c


def test_train_mode_is_restored_and_generation_ignores_checkpoint_defaults(model_and_tok):
    model, tok = model_and_tok
    model.train()
    model.generation_config.repetition_penalty = 50.0  # a checkpoint default that must not leak
    spec = GenerationSpec(do_sample=False, max_new_tokens=8)
    out, _ = generate(model, tok, examples(tok)[:1], spec, seed=0)
    assert model.training and model.generation_config.repetition_penalty == 50.0
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([examples(tok)[0].prompt_ids])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=8, repetition_penalty=1.0, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = ref[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert out[0] == tok.decode(new, skip_special_tokens=True).strip()
    model.generation_config.repetition_penalty = 1.0


# --- training rollouts (kdexp.rollout.sample) -----------------------------------------------

from kdexp.rollout import RolloutSpec, filter_logits, sample  # noqa: E402


@pytest.fixture(scope="module")
def teacher_and_tok():
    spec = {"name_or_path": asset_path("tiny-teacher"), "dtype": "float32", "lora": {"enabled": False}}
    model, tok = load_model(spec, "teacher")
    return model.eval(), tok


def test_greedy_rollouts_equal_hf_generate_on_left_padded_prompts(teacher_and_tok):
    model, tok = teacher_and_tok
    exs = examples(tok)
    out = sample(model, [e.prompt_ids for e in exs], RolloutSpec(do_sample=False, max_new_tokens=40),
                 tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(0))
    texts, lengths = generate(model, tok, exs, GenerationSpec(do_sample=False, max_new_tokens=40), seed=0)
    for o, text, n in zip(out, texts, lengths, strict=True):
        assert tok.decode(o.response_ids, skip_special_tokens=True).strip() == text
        stopped = o.response_ids[-1] == tok.eos_token_id
        assert len(o.response_ids) == n + stopped  # the EOS is kept in the response, nothing after it
        assert tok.eos_token_id not in o.response_ids[:-1]
    assert any(o.response_ids[-1] == tok.eos_token_id for o in out)  # the teacher does stop


def test_rollouts_stop_at_extra_stop_ids_and_cut_after_them(teacher_and_tok):
    model, tok = teacher_and_tok
    prompts = [e.prompt_ids for e in examples(tok)]
    g = torch.Generator()
    free = sample(model, prompts, RolloutSpec(do_sample=False, max_new_tokens=30), tok.eos_token_id,
                  tok.pad_token_id, g)
    stop = free[0].response_ids[3]  # a token the first row emits at its 4th step
    cut = sample(model, prompts, RolloutSpec(do_sample=False, max_new_tokens=30, stop_ids=(stop,)),
                 tok.eos_token_id, tok.pad_token_id, g)
    for f, c in zip(free, cut, strict=True):
        n = next(i + 1 for i, t in enumerate(f.response_ids + [stop]) if t in (stop, tok.eos_token_id))
        assert c.response_ids == f.response_ids[:n]
    assert len(cut[0].response_ids) == 4


def test_sampling_is_reproducible_and_logprobs_are_those_of_the_model(teacher_and_tok):
    model, tok = teacher_and_tok
    prompts = [e.prompt_ids for e in examples(tok)]
    spec = RolloutSpec(max_new_tokens=12, temperature=1.0)
    a = sample(model, prompts, spec, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(3))
    b = sample(model, prompts, spec, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(3))
    assert [x.response_ids for x in a] == [x.response_ids for x in b]
    # Teacher forcing the sampled response reproduces the recorded log-probabilities.
    row = a[1]
    ids = torch.tensor([prompts[1] + row.response_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    p = len(prompts[1])
    ref = [logp[p - 1 + i, t].item() for i, t in enumerate(row.response_ids)]
    assert row.logp_student == pytest.approx(ref, abs=1e-4)
    assert row.logp_sampler == pytest.approx(ref, abs=1e-4)  # T = 1, no cut: the same distribution


def test_teacher_mix_zero_and_one(teacher_and_tok, model_and_tok):
    teacher, tok = teacher_and_tok
    student, _ = model_and_tok
    prompts = [e.prompt_ids for e in examples(tok)]
    greedy = RolloutSpec(do_sample=False, max_new_tokens=10)
    g = torch.Generator()
    only_teacher = sample(student, prompts, greedy, tok.eos_token_id, tok.pad_token_id, g,
                          teacher=teacher, teacher_mix=1.0)
    teacher_alone = sample(teacher, prompts, greedy, tok.eos_token_id, tok.pad_token_id, g)
    assert [x.response_ids for x in only_teacher] == [x.response_ids for x in teacher_alone]
    # The student's log-probabilities are still the student's (for importance weights).
    assert only_teacher[0].logp_student != pytest.approx(teacher_alone[0].logp_student, abs=1e-3)
    mixed0 = sample(student, prompts, RolloutSpec(max_new_tokens=10), tok.eos_token_id, tok.pad_token_id,
                    torch.Generator().manual_seed(1), teacher=teacher, teacher_mix=0.0)
    for row in mixed0:  # alpha = 0: importance weights q / mix are exactly 1
        assert row.logp_sampler == pytest.approx(row.logp_student, abs=1e-5)


def test_mixture_sampling_frequencies_match_the_mixture():
    """One decoding step of two fixed 'models': the empirical token frequencies are alpha p + (1-alpha) q."""

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(logits))

        def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
            from types import SimpleNamespace
            return SimpleNamespace(logits=self.w.expand(input_ids.shape[0], input_ids.shape[1], -1),
                                   past_key_values=None)

    q, p = Fixed([2.0, 0.0, -1.0, 0.5]), Fixed([-1.0, 3.0, 0.0, 0.0])
    n = 20000
    out = sample(q, [[1]] * n, RolloutSpec(max_new_tokens=1), eos_id=99, pad_id=0,
                 generator=torch.Generator().manual_seed(0), teacher=p, teacher_mix=0.2)
    freq = torch.bincount(torch.tensor([o.response_ids[0] for o in out]), minlength=4).double() / n
    want = 0.2 * p.w.softmax(-1).double() + 0.8 * q.w.softmax(-1).double()
    assert torch.allclose(freq, want.detach(), atol=0.012)
    w = torch.tensor([math.exp(o.logp_student[0] - o.logp_sampler[0]) for o in out[:4]])
    tokens = [o.response_ids[0] for o in out[:4]]
    assert torch.allclose(w.double(), (q.w.softmax(-1).double() / want)[tokens].detach(), rtol=1e-5)


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).log_softmax(-1)
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    probs = logits.exp()[0]  # sorted: 1 (0.665), 2 (0.245), 0 (0.090), 3 (0.033)
    assert probs[1] < 0.7 < probs[1] + probs[2]
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[True, False, True, True]]
    assert not torch.isinf(filter_logits(logits, 0, 1.0)).any()
