"""Batched generation: left padding is exact, sampling is seeded per batch, EOS ends a response."""

from __future__ import annotations

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
