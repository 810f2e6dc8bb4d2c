"""A teacher with another tokenizer: the teacher's sequences and the alignment tensors of a
micro-batch (kdexp.teachers.cross), checked against the text they stand for."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from kdexp.data import collate_train
from kdexp.data.encode import Example
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.models import asset_path
from kdexp.teachers.cross import CrossTeacher

TEXTS = [("Repeat the words: apple banana\n", "apple banana"),
         ("Größe von 12345 in €?\n", "Das sind 12345 € — naïve café, 日本"),
         ("Say hi.\n", "hi")]


@pytest.fixture(scope="module")
def toks():
    return AutoTokenizer.from_pretrained(asset_path("tiny-student")), AutoTokenizer.from_pretrained(
        asset_path("tiny-teacher-other"))


def teacher(approach, student_tok, teacher_tok) -> CrossTeacher:
    """The teacher's batch-building side alone (no model needed)."""
    t = CrossTeacher.__new__(CrossTeacher)
    t.student_tok, t.teacher_tok, t.approach, t._aligned = student_tok, teacher_tok, approach, {}
    t.matched = torch.tensor([0]), torch.tensor([0])
    return t


def examples(tok, ended=(True, False, True)):
    out = []
    for (prompt, response), end in zip(TEXTS, ended, strict=True):
        ids = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if end else [])
        out.append(Example(tok(prompt, add_special_tokens=False)["input_ids"], ids, {}))
    return out


def text(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_span_rows_cover_the_same_text_on_both_sides(toks):
    s_tok, t_tok = toks
    exs = examples(s_tok)
    batch = {**collate_train(exs, s_tok.pad_token_id), **teacher("span", s_tok, t_tok).inputs(exs)}
    for b, e in enumerate(exs):
        seq = batch["x_input_ids"][b][batch["x_attention_mask"][b].bool()]
        assert text(t_tok, seq).replace(t_tok.eos_token, "") == text(s_tok, e.prompt_ids + e.response_ids).replace(
            s_tok.eos_token, "")
        spans = [(int(f), p, int(batch["x_first_t"][b, p]), int(batch["x_pos"][b, p]))
                 for p, f in enumerate(batch["x_first_s"][b]) if batch["x_pos"][b, p] >= 0]
        # the spans tile the response, in order, on both sides
        response_positions = (batch["targets"][b] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert [p for f, last, _, _ in spans for p in range(f, last + 1)] == response_positions
        t_positions = (batch["x_targets"][b] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert [p for _, _, f, last in spans for p in range(f, last + 1)] == t_positions
        for fs, ls, ft, lt in spans:  # each span: the same text predicted on both sides
            a = text(s_tok, batch["targets"][b, fs:ls + 1])
            c = text(t_tok, batch["x_targets"][b, ft:lt + 1])
            assert a == c or (a, c) == (s_tok.eos_token, t_tok.eos_token), (a, c)
    assert any(lt - ft != ls - fs for fs, ls, ft, lt in spans)  # the tokenizations do differ


def test_uld_pairs_response_positions_in_order(toks):
    s_tok, t_tok = toks
    exs = examples(s_tok)
    batch = {**collate_train(exs, s_tok.pad_token_id), **teacher("uld", s_tok, t_tok).inputs(exs)}
    for b, e in enumerate(exs):
        pairs = [(p, int(batch["x_pos"][b, p])) for p in range(batch["x_pos"].shape[1]) if batch["x_pos"][b, p] >= 0]
        n_t = int((batch["x_targets"][b] != IGNORE_INDEX).sum())
        assert len(pairs) == min(len(e.response_ids), n_t)
        p0, t0 = pairs[0]
        assert p0 == len(e.prompt_ids) - 1 and all(p - p0 == t - t0 for p, t in pairs)
        ended = e.response_ids[-1] == s_tok.eos_token_id
        assert (batch["x_targets"][b, t0 + n_t - 1] == t_tok.eos_token_id) == ended  # EOS for EOS


def test_identical_tokenizers_align_every_token_alone(toks):
    s_tok, _ = toks
    exs = examples(s_tok)
    batch = {**collate_train(exs, s_tok.pad_token_id), **teacher("span", s_tok, s_tok).inputs(exs)}
    valid = batch["targets"] != IGNORE_INDEX
    torch.testing.assert_close(batch["x_input_ids"], batch["input_ids"])
    assert torch.equal(batch["x_pos"] >= 0, valid)
    assert torch.equal(batch["x_pos"][valid], valid.nonzero()[:, 1])
