"""Aligning two tokenizations of the same text, for distillation across tokenizers.

    ends_s = char_ends(student_tokenizer, student_ids)      # where each token's text ends
    ends_t = char_ends(teacher_tokenizer, teacher_ids)
    for s, t in spans(ends_s, ends_t):                       # token ranges covering the same text
        ...

A token's place in the text is read from the tokenizer's own decoding: token ``i`` ends where
``decode(ids[:i + 1])`` ends. This needs no offsets from the tokenizer (slow tokenizers work), it
holds for any token sequence (a student's sample need not be the canonical tokenization of its
text, which a tokenizer's offsets would describe), and it places leading spaces and BOS-like
tokens where the decoding puts them. A token that stops inside a multi-byte UTF-8 character (its
prefix decodes to U+FFFD where the whole text has the character) has no end of its own: it belongs with the tokens that complete the
character. Tokens that add no text (a special token) end where the previous one did and join
its span.

A span is a pair of token ranges, one per side, that cover exactly the same characters: where
one side's token covers two of the other's (``"12"`` against ``"1"``, ``"2"``) the span holds
one token of the first and two of the second. Spans are as small as the two tokenizations allow.
"""

from __future__ import annotations

from collections.abc import Sequence

from kdexp.errors import UserError


def char_ends(tokenizer, ids: Sequence[int]) -> list[int | None]:
    """For each token, the length in characters of the text decoded up to and including it;
    ``None`` where that decoding is not a prefix of the whole text: it ends inside a multi-byte
    character (which it decodes as U+FFFD). Bytes that are not UTF-8 at all (a sampled token
    sequence can hold them) decode to U+FFFD in the whole text too: those are text."""
    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    whole = decode(ids)
    out: list[int | None] = []
    for i in range(len(ids)):
        text = decode(ids[:i + 1])
        out.append(len(text) if whole.startswith(text) else None)
    return out


def _next_end(ends: Sequence[int | None], i: int) -> tuple[int, int]:
    """From token ``i``: the first index after the tokens up to a defined end, and that end
    (a token without one joins the tokens that follow; zero-width tokens that follow join too)."""
    n = len(ends)
    while i < n and ends[i] is None:
        i += 1
    if i == n:
        return n, -1  # ends inside a character: the caller's check reports it
    end = ends[i]
    i += 1
    while i < n and ends[i] == end:  # adds no text: stays with this span
        i += 1
    return i, end


def spans(ends_s: Sequence[int | None], ends_t: Sequence[int | None]) -> list[tuple[range, range]]:
    """The pairs of token ranges (student's, teacher's) that cover the same text, in order.
    Both sequences must decode to the same text (the same last end)."""
    last_s = next((e for e in reversed(ends_s) if e is not None), 0)
    last_t = next((e for e in reversed(ends_t) if e is not None), 0)
    if last_s != last_t or (ends_s and ends_s[-1] is None) or (ends_t and ends_t[-1] is None):
        raise UserError(f"the two tokenizations do not cover the same text ({last_s} and {last_t} characters): "
                        f"a tokenizer whose decoding does not give back the text cannot be aligned")
    out = []
    i = j = 0
    n, m = len(ends_s), len(ends_t)
    while i < n and j < m:
        i0, j0 = i, j
        i, a = _next_end(ends_s, i)
        j, b = _next_end(ends_t, j)
        while a != b:
            if a < b:
                i, a = _next_end(ends_s, i)
            else:
                j, b = _next_end(ends_t, j)
        out.append((range(i0, i), range(j0, j)))
    if i < n or j < m:  # only tokens that add no text are left: they join the last span
        last_s_range, last_t_range = out[-1] if out else (range(0, 0), range(0, 0))
        out[-1:] = [(range(last_s_range.start, n), range(last_t_range.start, m))]
    return out
