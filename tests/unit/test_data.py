"""kdexp.data: reading files, records and templates, splits, tokenization and batching."""

from __future__ import annotations

import codecs
import copy
import csv
import importlib
import json
import logging

import pytest
import torch

from kdexp.data import sources
from kdexp.data.encode import Example, collate_prompts, collate_train, encode
from kdexp.data.templates import TEMPLATES
from kdexp.errors import UserError
from kdexp.losses.objective import IGNORE_INDEX

# kdexp.data re-exports the function encode(), which shadows the submodule's name.
enc = importlib.import_module("kdexp.data.encode")

# The MiniLLM / DistiLLM (Stanford Alpaca) prompts, written out here independently of kdexp.
MINILLM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
MINILLM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# The `data:` section of conf/config.yaml, by hand.
BASE_CFG = {
    "name": "unit",
    "source": "file",
    "path": None,
    "files": {"train": None, "valid": None, "test": None},
    "hub_id": None,
    "hub_split": "train",
    "fields": {"instruction": "instruction", "input": "input", "output": "output",
               "prompt": None, "references": None},
    "template": "alpaca",
    "split": {"seed": 42, "valid": 500, "test": 500},
    "max_prompt_length": 256,
    "max_length": 512,
    "max_new_tokens": 256,
    "too_long": "error",
    "on_error": "fail",
    "toy": {"seed": 0, "n_train": 4000, "n_valid": 200, "n_test": 200, "families": None},
}


def make_cfg(**over):
    cfg = copy.deepcopy(BASE_CFG)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


DOLLY_FIELDS = {"instruction": "instruction", "input": "context", "output": "response"}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kdexp.models import asset_path

    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-student"))
    assert tokenizer.eos_token_id is not None
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n, prefix="q"):
    return [{"instruction": f"{prefix} instruction {i}", "input": "" if i % 2 else f"ctx {i}",
             "output": f"answer {i}"} for i in range(n)]


# ---------------------------------------------------------------- read_rows


def test_read_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert sources.read_rows(path) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize(("text", "expected"), [
    ('{"a": 1}\n\n{"a": 2,}\n{"a": 3}\n', "bad.jsonl:3: malformed JSON"),
    # a message that ends with "at" gets no second one
    ('{"a": 1}\n{"instruction": "broken\n', "bad.jsonl:2: malformed JSON (Unterminated string starting at column 17)"),
])
def test_read_jsonl_malformed_line(tmp_path, text, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        sources.read_rows(path)
    msg = str(info.value)
    assert expected in msg and "at at" not in msg


def test_read_jsonl_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError) as info:
        sources.read_rows(path)
    assert "list.jsonl" in str(info.value)
    assert "list.jsonl:2" in str(info.value) or "line 2" in str(info.value)


def test_read_missing_file(tmp_path):
    with pytest.raises(UserError) as info:
        sources.read_rows(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)
    with pytest.raises(UserError):
        sources.read_rows(tmp_path)  # a directory is not a data file


def test_read_non_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as info:
        sources.read_rows(path)
    assert "latin.jsonl" in str(info.value)


def test_read_json_list(tmp_path):
    path = tmp_path / "d.json"
    data = [{"a": 1}, {"a": "é"}]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert [r for _, r in sources.read_rows(path)] == data
    bad = tmp_path / "bad.json"
    bad.write_text('[{"a": 1},', encoding="utf-8")
    with pytest.raises(UserError, match="bad.json"):
        sources.read_rows(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(UserError, match="obj.json"):
        sources.read_rows(obj)


def test_read_csv(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "say hi, please", "input": "", "output": 'hi "there"'})
        writer.writerow({"instruction": "b", "input": "c", "output": "d"})
    got = [r for _, r in sources.read_rows(path)]
    assert got == [{"instruction": "say hi, please", "input": "", "output": 'hi "there"'},
                   {"instruction": "b", "input": "c", "output": "d"}]


# ---------------------------------------------------------------- to_record / templates


def test_dolly_fields_through_alpaca_template():
    cfg = make_cfg(fields=DOLLY_FIELDS)
    with_ctx = {"instruction": "Summarize the text.", "context": "Cats sleep a lot.",
                "response": "Cats sleep.", "category": "summarization"}
    rec = sources.to_record(with_ctx, cfg, "x:1")
    assert rec["prompt"] == MINILLM_WITH_INPUT.format(instruction="Summarize the text.",
                                                      input="Cats sleep a lot.")
    assert rec["output"] == "Cats sleep."
    assert rec["references"] == ["Cats sleep."]

    no_ctx = {"instruction": "Name a color.", "context": "", "response": "Blue."}
    rec = sources.to_record(no_ctx, cfg, "x:2")
    assert rec["prompt"] == MINILLM_NO_INPUT.format(instruction="Name a color.")
    assert "### Input:" not in rec["prompt"]


def test_missing_optional_input_field_is_no_input():
    cfg = make_cfg()
    rec = sources.to_record({"instruction": "Do it.", "output": "Done."}, cfg, "x:1")
    assert rec["prompt"] == MINILLM_NO_INPUT.format(instruction="Do it.")


def test_missing_required_field_is_named():
    cfg = make_cfg(fields=DOLLY_FIELDS)
    with pytest.raises(UserError) as info:
        sources.to_record({"instruction": "a", "context": ""}, cfg, "file.jsonl:7")
    msg = str(info.value)
    assert "'response'" in msg
    assert "file.jsonl:7" in msg
    with pytest.raises(UserError, match="'instruction'"):
        sources.to_record({"response": "a"}, cfg, "file.jsonl:8")


def test_prompt_field_and_references():
    cfg = make_cfg(fields={"prompt": "text", "output": "answer", "references": "refs"}, template="none")
    rec = sources.to_record({"text": "Q: 2+2?", "answer": "4", "refs": ["4", "four"]}, cfg, "x")
    assert rec == {"prompt": "Q: 2+2?", "output": "4", "references": ["4", "four"]}
    rec = sources.to_record({"text": "Q", "answer": "A", "refs": "only"}, cfg, "x")
    assert rec["references"] == ["only"]
    rec = sources.to_record({"text": "Q", "answer": "A"}, cfg, "x")  # references optional
    assert rec["references"] == ["A"]
    with pytest.raises(UserError, match="'text'"):
        sources.to_record({"answer": "A"}, cfg, "x")


def test_templates():
    assert set(TEMPLATES.names()) >= {"alpaca", "compact", "none"}
    alpaca = TEMPLATES.get("alpaca")
    assert alpaca("Do X.", "") == MINILLM_NO_INPUT.format(instruction="Do X.")
    assert alpaca("Do X.", "some input") == MINILLM_WITH_INPUT.format(instruction="Do X.",
                                                                      input="some input")
    compact = TEMPLATES.get("compact")
    assert compact("Do X.", "") == "### Instruction:\nDo X.\n\n### Response:\n"
    assert compact("Do X.", "in") == "### Instruction:\nDo X.\n\n### Input:\nin\n\n### Response:\n"
    none = TEMPLATES.get("none")
    assert none("Do X.", "") == "Do X."
    assert none("Do X.", "in") == "Do X.\nin"
    with pytest.raises(UserError, match="did you mean"):
        TEMPLATES.get("alpacca")


# ---------------------------------------------------------------- seeded_split / load_splits


def _records(n):
    return [{"prompt": f"p{i}", "output": f"o{i}", "references": [f"o{i}"]} for i in range(n)]


def test_seeded_split_deterministic_disjoint_complete():
    recs = _records(50)
    a = sources.seeded_split(recs, seed=3, n_valid=7, n_test=5)
    b = sources.seeded_split(recs, seed=3, n_valid=7, n_test=5)
    assert a == b
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (38, 7, 5)
    ids = [r["prompt"] for s in ("train", "valid", "test") for r in a[s]]
    assert sorted(ids) == sorted(r["prompt"] for r in recs)  # disjoint and complete
    c = sources.seeded_split(recs, seed=4, n_valid=7, n_test=5)
    assert [r["prompt"] for r in c["test"]] != [r["prompt"] for r in a["test"]]
    # The input list itself is left alone.
    assert recs == _records(50)


def test_seeded_split_too_small():
    with pytest.raises(UserError):
        sources.seeded_split(_records(10), seed=0, n_valid=5, n_test=5)  # no training record left
    with pytest.raises(UserError):
        sources.seeded_split(_records(3), seed=0, n_valid=2, n_test=2)
    ok = sources.seeded_split(_records(11), seed=0, n_valid=5, n_test=5)
    assert len(ok["train"]) == 1


def test_load_splits_three_files(tmp_path):
    paths = {}
    data = {}
    for name, n in (("train", 6), ("valid", 3), ("test", 2)):
        data[name] = [{"instruction": f"{name} {i}", "context": "", "response": f"r {name} {i}"}
                      for i in range(n)]
        paths[name] = str(write_jsonl(tmp_path / f"{name}.jsonl", data[name]))
    cfg = make_cfg(files=paths, fields=DOLLY_FIELDS)
    splits = sources.load_splits(cfg)
    assert set(splits) == {"train", "valid", "test"}
    for name in ("train", "valid", "test"):
        assert [r["output"] for r in splits[name]] == [r["response"] for r in data[name]]
        assert splits[name][0]["prompt"] == MINILLM_NO_INPUT.format(instruction=f"{name} 0")


def test_load_splits_files_error_names_the_line(tmp_path):
    paths = {n: str(write_jsonl(tmp_path / f"{n}.jsonl", rows(3))) for n in ("train", "valid", "test")}
    (tmp_path / "valid.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(UserError) as info:
        sources.load_splits(make_cfg(files=paths))
    assert "valid.jsonl:2" in str(info.value)
    assert "'output'" in str(info.value)


def test_load_splits_some_files_missing(tmp_path):
    path = str(write_jsonl(tmp_path / "t.jsonl", rows(3)))
    with pytest.raises(UserError):
        sources.load_splits(make_cfg(files={"train": path, "valid": path, "test": None}))


def test_load_splits_empty_split_file(tmp_path):
    full = str(write_jsonl(tmp_path / "t.jsonl", rows(3)))
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError):
        sources.load_splits(make_cfg(files={"train": full, "valid": str(empty), "test": full}))


def test_load_splits_one_path_seeded(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", rows(20))
    cfg = make_cfg(path=str(path), split={"seed": 1, "valid": 3, "test": 4})
    splits = sources.load_splits(cfg)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [13, 3, 4]
    outputs = [r["output"] for s in splits.values() for r in s]
    assert sorted(outputs) == sorted(r["output"] for r in rows(20))
    assert sources.load_splits(cfg) == splits
    too_small = make_cfg(path=str(path), split={"seed": 1, "valid": 10, "test": 10})
    with pytest.raises(UserError):
        sources.load_splits(too_small)


def test_load_splits_no_source_configured():
    with pytest.raises(UserError):
        sources.load_splits(make_cfg())
    with pytest.raises(UserError):
        sources.load_splits(make_cfg(source="s3"))


def test_load_splits_toy():
    cfg = make_cfg(source="toy", template="compact",
                   toy={"seed": 0, "n_train": 20, "n_valid": 8, "n_test": 8, "families": None})
    splits = sources.load_splits(cfg)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [20, 8, 8]
    for rec in splits["test"]:
        assert rec["prompt"].startswith("### Instruction:\n")
        assert rec["prompt"].endswith("### Response:\n")
        assert rec["references"] == [rec["output"]]
    bad = make_cfg(source="toy", toy={"seed": 0, "n_train": 1, "n_valid": 0, "n_test": 1,
                                      "families": ["nope"]})
    with pytest.raises(UserError):
        sources.load_splits(bad)


# ---------------------------------------------------------------- encode


def _rec(prompt, output):
    return {"prompt": prompt, "output": output, "references": [output]}


def test_encode_boundary_and_eos(tok):
    recs = [_rec(MINILLM_NO_INPUT.format(instruction="Name a color."), "Blue."),
            _rec(MINILLM_WITH_INPUT.format(instruction="Sum.", input="1 2"), "The sum is three.")]
    out = encode(recs, tok, make_cfg(), "train")
    assert len(out) == 2
    for ex, rec in zip(out, recs, strict=True):
        assert isinstance(ex, Example)
        assert ex.record == rec
        assert tok.decode(ex.prompt_ids) == rec["prompt"]
        assert ex.response_ids[-1] == tok.eos_token_id
        assert tok.decode(ex.response_ids[:-1]) == rec["output"]
        assert ex.prompt_ids == tok(rec["prompt"])["input_ids"]


def _long_prompt(n_words):
    return " ".join(f"w{i}" for i in range(n_words)) + "\n### Response:\n"


def test_encode_too_long_error(tok):
    long = _rec(_long_prompt(40), "ok")
    n = len(tok(long["prompt"])["input_ids"])
    cfg = make_cfg(max_prompt_length=n - 1, max_length=n + 20, too_long="error")
    with pytest.raises(UserError) as info:
        encode([_rec("short\n", "a"), long], tok, cfg, "test")
    assert "record 1" in str(info.value)
    # Exactly at the limit is fine.
    ok = encode([long], tok, make_cfg(max_prompt_length=n, max_length=n + 20), "test")
    assert len(ok[0].prompt_ids) == n


def test_encode_truncate_keeps_last_tokens(tok):
    long = _rec(_long_prompt(40), "ok")
    full = tok(long["prompt"])["input_ids"]
    k = len(full) // 2
    cfg = make_cfg(max_prompt_length=k, max_length=k + 20, too_long="truncate")
    (ex,) = encode([long], tok, cfg, "train")
    assert ex.prompt_ids == full[-k:]
    assert tok.decode(ex.prompt_ids).endswith("### Response:\n")
    assert ex.response_ids[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def bos_tok(tok):
    """The tiny tokenizer made to open every text with a BOS token, as LLaMA's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tok.backend_tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    out = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    assert out("hi")["input_ids"][0] == bos and out("hi", add_special_tokens=False)["input_ids"][0] != bos
    return out


@pytest.mark.parametrize("policy", ["truncate", "cut_end"])
def test_encode_cut_prompts_keep_the_bos_token(bos_tok, policy):
    """A prompt cut to its last tokens (truncate) keeps the tokenizer's BOS in front: a LLaMA
    model never sees a sequence without it. cut_end keeps the first tokens, BOS included."""
    long = _rec(_long_prompt(40), "ok")
    full = bos_tok(long["prompt"])["input_ids"]
    k = len(full) // 2
    (ex,) = encode([long], bos_tok, make_cfg(max_prompt_length=k, max_length=k + 20, too_long=policy), "train")
    assert len(ex.prompt_ids) == k and ex.prompt_ids[0] == bos_tok.bos_token_id
    if policy == "truncate":
        assert ex.prompt_ids[1:] == full[-(k - 1):]
        assert bos_tok.decode(ex.prompt_ids).endswith("### Response:\n")
    else:
        assert ex.prompt_ids == full[:k]


def test_encode_skip_drops_long_prompts(tok):
    recs = [_rec("short one\n", "a"), _rec(_long_prompt(40), "b"), _rec("short two\n", "c")]
    n_long = len(tok(recs[1]["prompt"])["input_ids"])
    cfg = make_cfg(max_prompt_length=n_long - 1, max_length=n_long + 10, too_long="skip")
    out = encode(recs, tok, cfg, "train")
    assert [ex.record["output"] for ex in out] == ["a", "c"]
    # Skipping everything is an error, not an empty split.
    with pytest.raises(UserError):
        encode([recs[1]], tok, cfg, "train")


def test_encode_bad_policy(tok):
    with pytest.raises(UserError):
        encode([_rec("p\n", "o")], tok, make_cfg(too_long="drop"), "train")
    assert set(enc.TOO_LONG) == {"truncate", "cut_end", "skip", "error"}


def test_encode_response_cut_by_max_length_has_no_eos(tok):
    rec = _rec("Question:\n", "one two three four five six seven eight nine ten")
    p = tok(rec["prompt"])["input_ids"]
    r = tok(rec["output"], add_special_tokens=False)["input_ids"]
    assert len(r) > 4
    # Room for all of the response but not its EOS: cut, no EOS.
    cfg = make_cfg(max_prompt_length=len(p), max_length=len(p) + len(r))
    (ex,) = encode([rec], tok, cfg, "train")
    assert ex.response_ids == r
    # Room for half of it.
    cfg = make_cfg(max_prompt_length=len(p), max_length=len(p) + 3)
    (ex,) = encode([rec], tok, cfg, "train")
    assert ex.response_ids == r[:3]
    assert tok.eos_token_id not in ex.response_ids
    assert len(ex.prompt_ids) + len(ex.response_ids) == cfg["max_length"]
    # Exactly enough room: EOS kept.
    cfg = make_cfg(max_prompt_length=len(p), max_length=len(p) + len(r) + 1)
    (ex,) = encode([rec], tok, cfg, "train")
    assert ex.response_ids == r + [tok.eos_token_id]


def test_encode_empty_prompt(tok):
    with pytest.raises(UserError) as info:
        encode([_rec("fine\n", "a"), _rec("", "b")], tok, make_cfg(), "valid")
    assert "valid split, record 1" in str(info.value)
    assert "data.on_error=skip" in str(info.value)


def test_encode_empty_prompt_skipped_and_counted(tok, caplog):
    cfg = make_cfg(on_error="skip")
    with caplog.at_level(logging.WARNING, logger="kdexp.data.encode"):
        out = encode([_rec("fine\n", "a"), _rec("", "b"), _rec("also fine\n", "c")], tok, cfg, "train")
    assert [ex.record["output"] for ex in out] == ["a", "c"]
    assert "1 skipped as empty" in caplog.text
    with pytest.raises(UserError) as info:  # nothing left: say what removed the records
        encode([_rec("", "b")], tok, cfg, "valid")
    assert "the valid split is empty" in str(info.value)
    assert "1 had an empty prompt (data.on_error=skip)" in str(info.value)


def test_encode_empty_response_is_just_eos(tok):
    (ex,) = encode([_rec("Say nothing.\n", "")], tok, make_cfg(), "train")
    assert ex.response_ids == [tok.eos_token_id]


# ---------------------------------------------------------------- collate


def _examples():
    return [Example([11, 12, 13], [21, 22, 0], {}),          # EOS == 0 == pad below
            Example([14], [23, 24, 25, 26, 0], {}),
            Example([15, 16, 17, 18, 19], [27], {}),
            Example([31, 32], [], {})]                       # nothing to train on


@pytest.mark.parametrize("pad_id", [0, 999])
def test_collate_train(pad_id):
    examples = _examples()
    batch = collate_train(examples, pad_id)
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    B, T = len(examples), max(lengths)
    for tensor in (ids, mask, targets):
        assert tensor.shape == (B, T)
        assert tensor.dtype == torch.long
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        n, p = len(seq), len(e.prompt_ids)
        # Right padding.
        assert ids[b].tolist() == seq + [pad_id] * (T - n)
        assert mask[b].tolist() == [1] * n + [0] * (T - n)
        for t in range(T):
            if p <= t + 1 < n:  # the next token is a response token
                assert targets[b, t].item() == ids[b, t + 1].item() == seq[t + 1]
            else:               # prompt, last position, padding
                assert targets[b, t].item() == IGNORE_INDEX
        assert (targets[b] != IGNORE_INDEX).sum().item() == len(e.response_ids)
    assert targets[:, -1].eq(IGNORE_INDEX).all()


def test_collate_prompts_left_padding():
    examples = _examples()
    batch = collate_prompts(examples, pad_id=999)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    P = max(len(e.prompt_ids) for e in examples)
    assert ids.shape == mask.shape == (len(examples), P)
    for b, e in enumerate(examples):
        k = len(e.prompt_ids)
        assert ids[b].tolist() == [999] * (P - k) + e.prompt_ids
        assert mask[b].tolist() == [0] * (P - k) + [1] * k
    # Every row ends with its last prompt token: generation continues right after it.
    assert ids[:, -1].tolist() == [e.prompt_ids[-1] for e in examples]


def test_encode_then_collate_trains_on_the_response(tok):
    recs = [_rec(MINILLM_NO_INPUT.format(instruction="Name a color."), "Blue."),
            _rec(MINILLM_WITH_INPUT.format(instruction="Add.", input="two and two"), "Four, of course.")]
    examples = encode(recs, tok, make_cfg(), "train")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate_train(examples, pad)
    for b, rec in enumerate(recs):
        trained = batch["targets"][b][batch["targets"][b] != IGNORE_INDEX].tolist()
        assert trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) == rec["output"]


# ---------------------------------------------------------------- known bugs (see the report)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_read_jsonl_unicode_line_separator_inside_a_string(tmp_path, sep):
    path = tmp_path / "u.jsonl"
    row = {"instruction": f"first{sep}second", "output": "ok"}
    # json.dumps(ensure_ascii=False) writes these characters raw: the line is valid JSON.
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert sources.read_rows(path) == [(1, row)]


def test_read_csv_multiline_field(tmp_path):
    path = tmp_path / "m.csv"
    row = {"instruction": "line one\nline two", "input": "", "output": "a\nb"}
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    assert [r for _, r in sources.read_rows(path)] == [row]


# ---------------------------------------------------------------- evaluation sets


def test_output_list_gives_references_and_newline_marker_is_a_newline():
    """MiniLLM's processed files: an output may list several answers; "<n>" stands for "\\n"."""
    cfg = make_cfg(fields={"prompt": "prompt", "output": "output"}, template="none", newline_marker="<n>")
    rec = sources.to_record({"prompt": "Q:<n>two?<n>", "output": ["2<n>", "two"]}, cfg, "x")
    assert rec == {"prompt": "Q:\ntwo?\n", "output": "2\n", "references": ["2\n", "two"]}
    with pytest.raises(UserError, match="output list is empty"):
        sources.to_record({"prompt": "Q", "output": []}, cfg, "x")
    plain = sources.to_record({"prompt": "a<n>b", "output": "c"}, make_cfg(fields={"prompt": "prompt"},
                                                                           template="none"), "x")
    assert plain["prompt"] == "a<n>b"  # no marker configured: the text is left alone


def test_an_evaluation_set_is_its_whole_test_file_up_to_the_cap(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "output": f"o{i}"}) + "\n" for i in range(7)))
    cfg = make_cfg(files={"train": None, "valid": None, "test": str(path)}, fields={"prompt": "prompt"},
                   template="none", split={"seed": 1, "valid": 0, "test": None})
    assert [r["prompt"] for r in sources.load_test_split(cfg)] == [f"p{i}" for i in range(7)]
    cfg["split"]["test"] = 3
    assert [r["output"] for r in sources.load_test_split(cfg)] == ["o0", "o1", "o2"]  # the first N, in order


def test_encode_cut_end_keeps_the_first_tokens(tok):
    """MiniLLM's evaluation keeps prompt_ids[:max_prompt_length]."""
    long = _rec(_long_prompt(40), "ok")
    full = tok(long["prompt"])["input_ids"]
    k = len(full) // 2
    (ex,) = encode([long], tok, make_cfg(max_prompt_length=k, max_length=k + 20, too_long="cut_end"), "test")
    assert ex.prompt_ids == full[:k]


# ---------------------------------------------------------------- bad rows (data.on_error)

GOOD = {"instruction": "good", "input": "", "output": "fine"}

# (line 3 of a .jsonl file between good rows, what the error says about it)
BAD_LINES = {
    "malformed": (b'{"instruction": "a", "output": "b",}', "malformed JSON"),
    "not-utf8": ('{"instruction": "caf\xe9", "output": "b"}'.encode("latin-1"), "not UTF-8"),
    "not-an-object": (b'["a", "b"]', "expected a JSON object, got list"),
    "missing-field": (b'{"instruction": "a"}', "missing field 'output'"),
    "empty-response": (b'{"instruction": "a", "output": ""}', "the output is empty"),
    "blank-response": (b'{"instruction": "a", "output": " \\n\\t "}', "the output is empty"),
    "null-response": (b'{"instruction": "a", "output": null}', "the output is empty"),
    "empty-output-list": (b'{"instruction": "a", "output": []}', "the output list is empty"),
    "empty-prompt": (b'{"instruction": "  ", "output": "b"}', "the instruction is empty"),
}


def write_with_bad_line(path, bad: bytes, n_good=5):
    """Good rows on every line but line 3."""
    lines = [json.dumps({**GOOD, "output": f"fine {i}"}).encode() for i in range(n_good)]
    lines.insert(2, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", BAD_LINES)
def test_a_bad_row_fails_naming_file_and_line(tmp_path, kind):
    bad, reason = BAD_LINES[kind]
    path = write_with_bad_line(tmp_path / "d.jsonl", bad)
    with pytest.raises(UserError) as info:
        sources.load_splits(make_cfg(path=str(path), split={"seed": 0, "valid": 1, "test": 1}))
    msg = str(info.value)
    assert f"d.jsonl:3: {reason}" in msg
    assert msg.endswith("; fix the line or set data.on_error=skip")
    assert "\n" not in msg


@pytest.mark.parametrize("kind", BAD_LINES)
def test_a_bad_row_is_skipped_and_counted(tmp_path, kind, caplog):
    bad, reason = BAD_LINES[kind]
    path = write_with_bad_line(tmp_path / "d.jsonl", bad)
    cfg = make_cfg(path=str(path), split={"seed": 0, "valid": 1, "test": 1}, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="kdexp.data.sources"):
        splits = sources.load_splits(cfg)
    assert sorted(r["output"] for s in splits.values() for r in s) == [f"fine {i}" for i in range(5)]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"data: skipped 1 bad rows of {path} (first: {path}:3: {reason}")


def test_one_warning_per_file_counts_read_and_record_problems(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\nnot json\n{"instruction": "c"}\n'
                    '{"instruction": "d", "output": "e"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="kdexp.data.sources"):
        records = sources.load_test_split(make_cfg(files={"test": str(path)}, on_error="skip"))
    assert [r["output"] for r in records] == ["b", "e"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"skipped 2 bad rows of {path} (first: {path}:2: malformed JSON" in warning


def test_read_rows_non_utf8_byte_on_line_3(tmp_path, caplog):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "caf\xe9"}\n{"a": 4}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl:3: not UTF-8 .*byte 0xe9"):
        sources.read_rows(path)
    with caplog.at_level(logging.WARNING, logger="kdexp.data.sources"):
        assert sources.read_rows(path, on_error="skip") == [(1, {"a": 1}), (2, {"a": 2}), (4, {"a": 4})]
    assert "skipped 1 bad rows" in caplog.text and "latin.jsonl:3: not UTF-8" in caplog.text


def test_empty_prompt_field():
    cfg = make_cfg(fields={"prompt": "text", "output": "answer"}, template="none")
    with pytest.raises(sources.BadRow, match=r"^x:4: the prompt is empty \(field 'text'\)$"):
        sources.to_record({"text": "\n ", "answer": "A"}, cfg, "x:4")


def test_a_split_of_only_bad_rows_says_so(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text("".join('{"instruction": "a", "output": " "}\n' for _ in range(3)), encoding="utf-8")
    good = str(write_jsonl(tmp_path / "good.jsonl", rows(3)))
    cfg = make_cfg(files={"train": str(bad), "valid": good, "test": good}, on_error="skip")
    with pytest.raises(UserError) as info:
        sources.load_splits(cfg)
    assert str(info.value).startswith(f"data 'unit': the train split is empty: all 3 rows of {bad} "
                                      f"were skipped as bad (data.on_error=skip); the first: {bad}:1: "
                                      f"the output is empty")
    with pytest.raises(UserError, match=f"all 3 rows of {bad} were skipped as bad"):  # one file, split by seed
        sources.load_splits(make_cfg(path=str(bad), on_error="skip"))
    with pytest.raises(UserError, match="the test split is empty: all 3 rows"):  # an evaluation set
        sources.load_test_split(make_cfg(files={"test": str(bad)}, on_error="skip"))


def test_an_empty_file_and_a_zero_split_size_say_so(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n \n", encoding="utf-8")
    full = str(write_jsonl(tmp_path / "t.jsonl", rows(5)))
    with pytest.raises(UserError, match=f"the valid split is empty: {empty} holds no records"):
        sources.load_splits(make_cfg(files={"train": full, "valid": str(empty), "test": full}))
    with pytest.raises(UserError, match="the valid split is empty: data.split.valid is 0"):
        sources.load_splits(make_cfg(path=full, split={"seed": 0, "valid": 0, "test": 1}))


def test_on_error_must_be_fail_or_skip(tmp_path, tok):
    path = str(write_jsonl(tmp_path / "d.jsonl", rows(5)))
    for load in (sources.load_splits, sources.load_test_split):
        with pytest.raises(UserError, match="^data.on_error must be fail or skip, got 'ignore'$"):
            load(make_cfg(path=path, on_error="ignore"))
    with pytest.raises(UserError, match="data.on_error must be fail or skip"):
        encode([_rec("p\n", "o")], tok, make_cfg(on_error="warn"), "train")
    # A config from before the key existed fails on the first bad row.
    old = make_cfg(path=str(write_with_bad_line(tmp_path / "b.jsonl", b"{")), split={"seed": 0, "valid": 1, "test": 1})
    del old["on_error"]
    with pytest.raises(UserError, match="b.jsonl:3: malformed JSON"):
        sources.load_splits(old)


def test_a_byte_order_mark_is_harmless(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'{"a": 1}\n{"a": 2\n')
    assert sources.read_rows(path, on_error="skip") == [(1, {"a": 1})]
    with pytest.raises(UserError, match="bom.jsonl:2: malformed JSON"):  # line numbers unchanged
        sources.read_rows(path)
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(codecs.BOM_UTF8 + b"instruction,output\nq,a\n")
    assert sources.read_rows(csv_path) == [(2, {"instruction": "q", "output": "a"})]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_non_utf8_csv_or_json_file_names_the_line(tmp_path, suffix):
    path = tmp_path / f"latin{suffix}"
    text = ('instruction,output\nq,a\ncaf\xe9,b\n' if suffix == ".csv"
            else '[{"a": 1},\n {"a": 2},\n {"a": "caf\xe9"}]')
    path.write_bytes(codecs.BOM_UTF8 + text.encode("latin-1"))
    with pytest.raises(UserError, match=rf"latin\{suffix}:3: not UTF-8 .*byte 0xe9"):
        sources.read_rows(path, on_error="skip")  # the whole file is unreadable: no row to skip
