"""Model loading through the same code path as hub presets, on local directories."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from kdexp.errors import UserError
from kdexp.models import asset_path, load_model, load_tokenizer, resolve_init, shared_vocab, vocab_rows


def spec(path, **extra):
    base = {"name_or_path": str(path), "init": "pretrained", "dtype": "float32", "revision": None,
            "trust_remote_code": False, "attn_implementation": None,
            "lora": {"enabled": False, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}}
    return {**base, **extra}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A local GPT-2-architecture model directory with the bundled tokenizer."""
    path = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(asset_path("tiny-student"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_directory_loads_like_a_hub_name(gpt2_dir):
    model, tok = load_model(spec(gpt2_dir))
    assert type(model).__name__ == "GPT2LMHeadModel" and tok.pad_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id


def test_dtype_is_applied(gpt2_dir):
    model, _ = load_model(spec(gpt2_dir, dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_random_init_is_seeded_and_differs_from_pretrained(gpt2_dir):
    torch.manual_seed(1)
    a, _ = load_model(spec(gpt2_dir, init="random"))
    torch.manual_seed(1)
    b, _ = load_model(spec(gpt2_dir, init="random"))
    c, _ = load_model(spec(gpt2_dir))
    w = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_auto_init_loads_weights_when_the_directory_has_them(gpt2_dir, tmp_path):
    """``init: auto`` (the tiny student's): random from a config-only folder, the saved weights
    from a trained folder, so ``student.name_or_path=runs/sft/final`` starts from the SFT model."""
    w = "transformer.h.0.attn.c_attn.weight"
    pretrained, _ = load_model(spec(gpt2_dir))
    assert torch.equal(load_model(spec(gpt2_dir, init="auto"))[0].state_dict()[w], pretrained.state_dict()[w])
    config_only = tmp_path / "config-only"
    pretrained.config.save_pretrained(config_only)
    AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(config_only)
    torch.manual_seed(3)
    auto, _ = load_model(spec(config_only, init="auto"))
    torch.manual_seed(3)
    random, _ = load_model(spec(config_only, init="random"))
    assert torch.equal(auto.state_dict()[w], random.state_dict()[w])
    assert resolve_init({"name_or_path": "gpt2", "init": "auto"}) == "pretrained"  # a hub name
    with pytest.raises(UserError, match="student.init"):
        resolve_init({"name_or_path": str(gpt2_dir), "init": "fresh"})


@pytest.mark.parametrize("path_fn, expected", [
    (lambda d: d, {"c_attn"}),                                   # GPT-2's fused projection
    (lambda d: asset_path("tiny-student"), {"q_proj", "v_proj"}),  # LLaMA-style attention
])
def test_lora_targets_follow_the_architecture(gpt2_dir, path_fn, expected):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}
    model, _ = load_model(spec(path_fn(gpt2_dir), init="random", lora=lora))
    adapted = {name.split(".")[-2] for name, _ in model.named_parameters() if "lora_A" in name}
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == expected
    assert adapted  # adapters exist
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_lora_target_is_a_user_error(gpt2_dir):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["nope_proj"]}
    with pytest.raises(UserError, match="target_modules"):
        load_model(spec(gpt2_dir, lora=lora))


def test_unreachable_hub_name_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="student.name_or_path"):
        load_model(spec("no-such-org/no-such-model-kdexp"))


def test_missing_directory_names_the_role():
    with pytest.raises(UserError, match="teacher"):
        load_tokenizer(spec("/nonexistent/dir"), "teacher")


def test_padded_embeddings_are_aligned_to_the_shared_tokenizer(gpt2_dir, caplog):
    """Same tokenizer, logit rows padded differently (like Qwen2.5 0.5B vs 7B)."""
    student, tok = load_model(spec(gpt2_dir))
    teacher, t_tok = load_model(spec(gpt2_dir))
    teacher.resize_token_embeddings(len(tok) + 64)
    assert vocab_rows(teacher) == len(tok) + 64 != vocab_rows(student)
    with caplog.at_level(logging.INFO, logger="kdexp.models"):
        assert shared_vocab(student, tok, teacher, t_tok, ("s", "t")) == len(tok)
    assert "compared on the 1024 tokens" in caplog.text
    assert shared_vocab(student, tok, student, tok, ("s", "s")) is None


def test_equally_padded_embeddings_are_compared_on_the_tokenizers_tokens(gpt2_dir):
    """Same tokenizer, both models padded to the same width beyond it (Qwen2.5's 151,936 rows for
    151,665 tokens): the padded rows are not tokens and stay out of the divergences."""
    student, tok = load_model(spec(gpt2_dir))
    teacher, t_tok = load_model(spec(gpt2_dir))
    for model in (student, teacher):
        model.resize_token_embeddings(len(tok) + 64)
    assert vocab_rows(student) == vocab_rows(teacher) == len(tok) + 64
    assert shared_vocab(student, tok, teacher, t_tok, ("s", "t")) == len(tok)


def test_different_tokenizers_are_an_error_naming_both(gpt2_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "hello": 1, "world": 2}
    raw = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
    student, tok = load_model(spec(gpt2_dir))
    with pytest.raises(UserError, match="'my-student'.*'my-teacher'.*different tokenizers"):
        shared_vocab(student, tok, student, other, ("my-student", "my-teacher"))
