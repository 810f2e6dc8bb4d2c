"""Aligning two tokenizations of the same text (kdexp.losses.align) on hand-built cases."""

from __future__ import annotations

import pytest

from kdexp.errors import UserError
from kdexp.losses.align import char_ends, spans


class Bytes:
    """A tokenizer whose tokens are given byte strings (a token may end inside a character)."""

    def __init__(self, table: dict[int, bytes]):
        self.table = table

    def decode(self, ids, **_):
        return b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")


def pairs(s_tok, s_ids, t_tok, t_ids):
    return [(list(a), list(b)) for a, b in spans(char_ends(s_tok, s_ids), char_ends(t_tok, t_ids))]


def test_identical_tokenizations_align_token_by_token():
    tok = Bytes({1: b"Hel", 2: b"lo", 3: b" world"})
    assert pairs(tok, [1, 2, 3], tok, [1, 2, 3]) == [([0], [0]), ([1], [1]), ([2], [2])]


def test_a_token_of_one_side_spanning_two_of_the_other():
    s = Bytes({1: b"12", 2: b"3", 3: b" apples"})
    t = Bytes({1: b"1", 2: b"2", 3: b"3", 4: b" app", 5: b"les"})
    assert pairs(s, [1, 2, 3], t, [1, 2, 3, 4, 5]) == [([0], [0, 1]), ([1], [2]), ([2], [3, 4])]
    # crossing boundaries: the smallest span that both sides close
    s2 = Bytes({1: b"ab", 2: b"cd"})
    t2 = Bytes({1: b"a", 2: b"bc", 3: b"d"})
    assert pairs(s2, [1, 2], t2, [1, 2, 3]) == [([0, 1], [0, 1, 2])]


def test_leading_spaces_belong_to_the_token_that_carries_them():
    s = Bytes({1: b"a", 2: b" b", 3: b" c"})
    t = Bytes({1: b"a", 2: b" ", 3: b"b", 4: b" c"})
    assert pairs(s, [1, 2, 3], t, [1, 2, 3, 4]) == [([0], [0]), ([1], [1, 2]), ([2], [3])]


def test_multibyte_characters_split_inside_a_character():
    e = "é".encode()  # 2 bytes
    euro = "€".encode()  # 3 bytes
    s = Bytes({1: b"caf" + e, 2: b" 5" + euro})
    t = Bytes({1: b"caf", 2: e[:1], 3: e[1:], 4: b" 5", 5: euro[:2], 6: euro[2:]})
    assert char_ends(t, [1, 2, 3, 4, 5, 6]) == [3, None, 4, 6, None, 7]
    assert pairs(s, [1, 2], t, [1, 2, 3, 4, 5, 6]) == [([0], [0, 1, 2]), ([1], [3, 4, 5])]
    # the student splits the same character elsewhere: still one span for it
    s2 = Bytes({1: b"caf" + e[:1], 2: e[1:]})
    assert pairs(s2, [1, 2], t, [1, 2, 3]) == [([0, 1], [0, 1, 2])]


def test_tokens_that_add_no_text_join_the_span_before_them():
    s = Bytes({1: b"ab", 9: b""})
    t = Bytes({1: b"a", 2: b"b"})
    assert pairs(s, [1, 9], t, [1, 2]) == [([0, 1], [0, 1])]


def test_texts_that_differ_cannot_be_aligned():
    s, t = Bytes({1: b"abc"}), Bytes({1: b"abd", 2: b"x"})
    with pytest.raises(UserError, match="do not cover the same text"):
        spans(char_ends(s, [1]), char_ends(t, [1, 2]))


def test_the_bundled_tokenizers_align_on_text_with_multibyte_characters():
    from transformers import AutoTokenizer

    from kdexp.models import asset_path

    student = AutoTokenizer.from_pretrained(asset_path("tiny-student"))
    teacher = AutoTokenizer.from_pretrained(asset_path("tiny-teacher-other"))
    text = "Größe: 12345 € — naïve café, 日本語 ok"
    s_ids = student(text, add_special_tokens=False)["input_ids"]
    t_ids = teacher(text, add_special_tokens=False)["input_ids"]
    got = spans(char_ends(student, s_ids), char_ends(teacher, t_ids))
    assert [i for a, _ in got for i in a] == list(range(len(s_ids)))  # every token once, in order
    assert [j for _, b in got for j in b] == list(range(len(t_ids)))
    for a, b in got:  # each span is the same text on both sides (spans start on whole characters)
        assert student.decode([s_ids[i] for i in a]) == teacher.decode([t_ids[j] for j in b])
    assert any(len(b) > 1 for a, b in got if len(a) == 1)  # digits split one by one by the teacher


def test_bytes_that_are_not_utf8_are_text_like_any_other():
    """A sampled sequence can end inside a character, or hold bytes that are no character at all:
    both decode to U+FFFD in the whole text, which the other side encodes as a character."""
    e = "é".encode()
    s = Bytes({1: b"ab", 2: e[:1]})  # ends inside a character
    t = Bytes({1: b"a", 2: b"b", 3: "\ufffd".encode()})
    assert s.decode([1, 2]) == t.decode([1, 2, 3]) == "ab\ufffd"
    assert pairs(s, [1, 2], t, [1, 2, 3]) == [([0], [0, 1]), ([1], [2])]
    s2 = Bytes({1: b"\xff", 2: b"x"})  # a byte that starts no character, mid-text
    t2 = Bytes({1: "\ufffd".encode() + b"x"})
    assert pairs(s2, [1, 2], t2, [1]) == [([0, 1], [0])]


class Named(Bytes):
    """Bytes with token names (what alignment compares to find tokens that are the same strings)."""

    def convert_ids_to_tokens(self, ids):
        return [self.table[i].hex() for i in ids]


def test_a_character_split_differently_is_not_compared_token_by_token():
    """The earlier tokens of a span decide whether its last tokens continue the same text; pieces
    of a character all decode to U+FFFD, so their bytes, not their decoding, must agree: 日 split
    E6 | 97 A5 on one side and E6 97 | A5 on the other is compared sorted only (not direct)."""
    from kdexp.teachers.cross import alignment

    day = "日".encode()
    s = Named({1: day[:1], 2: day[1:], 3: b" x"})
    t = Named({1: day[:2], 2: day[2:], 3: b" ", 4: b"x"})
    got = alignment("span", s, t, [1, 2, 3], [1, 2, 3, 4], ended=False)
    assert got == [([0, 1], [0, 1], False), ([2], [2, 3], False)]  # " x" against " ", "x": other text too
    same = Named({1: day[:1], 2: day[1:]})
    assert alignment("span", s, same, [1, 2], [1, 2], ended=False) == [([0], [0], True), ([1], [1], True)]
    one = Named({1: b"ab", 2: b"c"})
    assert alignment("span", one, one, [1, 2], [1, 2], ended=True) == [([0], [0], True), ([1], [1], True),
                                                                       ([2], [2], True)]
