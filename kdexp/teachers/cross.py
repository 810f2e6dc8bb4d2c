"""A teacher with another tokenizer (``loss.cross_tokenizer=uld|span``).

    kdexp train teacher=tiny-other loss.cross_tokenizer=span     # the bundled other-tokenizer teacher
    kdexp train teacher=tiny-other loss.cross_tokenizer=uld

Every micro-batch is given to the teacher as text in its own tokens: the prompt and the response
of each sequence are decoded from the student's tokens and encoded by the teacher's tokenizer
*separately*, so the response starts at the same place on both sides (the prompt gets the
teacher's special tokens, a BOS if it adds one; a response that ended with the student's end of
text ends with the teacher's). On-policy samples go the same way: the student's sampled tokens,
whatever they are, are decoded to their text.

The batch then carries, in the student's positions, where each position's teacher distribution
is (:func:`alignment`): ``uld`` pairs the response positions in order from the first (as ULD's
code does); ``span`` aligns the two tokenizations of the response text into spans that cover the
same characters (:mod:`kdexp.losses.align`) and puts each span at the student position that
predicts its last token. The losses are in :mod:`kdexp.losses.cross`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from kdexp.errors import UserError
from kdexp.losses.align import char_ends, spans
from kdexp.losses.cross import matched_ids
from kdexp.losses.fused import Sparse
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.teacher_cache import tail_logit
from kdexp.teachers.base import Logits, logits_of
from kdexp.teachers.live import LiveTeacher
from kdexp.teachers.server import ServerTeacher

log = logging.getLogger(__name__)

# Text the two tokenizers must give back as it is: spaces, digits, multi-byte characters.
PROBE = "Hello,  world 12.5% x\ty\né € 日本 Ünïcode"


def lossless_problems(student_tok, teacher_tok) -> list[str]:
    """The tokenizers that do not give back the text they encode, or that put a space in front of
    a text encoded alone (SentencePiece's dummy prefix: a response encoded apart from its prompt
    would not follow it as in the text). Alignment needs neither to happen."""
    out = []
    head, tail = PROBE[:7], PROBE[7:]  # "Hello, " + " world ...": the tail starts with a space
    for who, tok in (("student", student_tok), ("teacher", teacher_tok)):
        def decode(ids: list[int], tok=tok) -> str:
            return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        def encode(text: str, tok=tok) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        back, joined = decode(encode(PROBE)), decode(encode(head) + encode(tail))
        if back != PROBE:
            out.append(f"loss.cross_tokenizer aligns the two tokenizations on their text, and the {who}'s tokenizer "
                       f"does not give back the text it encodes ({PROBE!r} comes back as {back!r}): use a "
                       f"tokenizer whose decoding is lossless (byte-level BPE, ...)")
        elif joined != PROBE:
            out.append(f"loss.cross_tokenizer encodes a prompt and its response apart, and the {who}'s tokenizer "
                       f"changes a text encoded in two parts ({PROBE!r} comes back as {joined!r}: a space put in "
                       f"front of each part, as SentencePiece's dummy prefix does): use a byte-level BPE tokenizer")
    return out


def teacher_tokens(student_tok, teacher_tok, prompt_ids: Sequence[int], response_ids: Sequence[int],
                   ) -> tuple[list[int], list[int], bool]:
    """The teacher's tokens of one sequence: its prompt, its response (without the end of text),
    and whether the student's response ended with its end of text."""
    ended = bool(response_ids) and response_ids[-1] == student_tok.eos_token_id
    body = list(response_ids[:-1] if ended else response_ids)
    prompt_text = student_tok.decode(list(prompt_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    response_text = student_tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    prompt = teacher_tok(prompt_text, add_special_tokens=True)["input_ids"]
    if prompt and prompt[-1] == teacher_tok.eos_token_id and teacher_tok.eos_token_id != teacher_tok.bos_token_id:
        prompt = prompt[:-1]  # a tokenizer that ends every text with EOS: not inside a sequence
    response = teacher_tok(response_text, add_special_tokens=False)["input_ids"]
    if not prompt:
        raise UserError(f"a prompt is empty in the teacher's tokens ({prompt_text!r}), and the teacher adds no "
                        f"BOS: its first response token would have no position to be predicted from")
    return prompt, response, ended


def alignment(approach: str, student_tok, teacher_tok, body_s: Sequence[int], body_t: Sequence[int],
              ended: bool) -> list[tuple[list[int], list[int]]]:
    """Pairs of response token indices (student's, teacher's) the loss compares, in order, and
    whether their last tokens continue the same text (``direct``): for ``uld`` single positions
    paired from the first; for ``span`` the aligned spans (the end of text, if any, one more span
    of one token each), a span whose tokens are the same strings on both sides (the bytes of one
    character, split alike) taken token by token."""
    n_s, n_t = len(body_s) + ended, len(body_t) + ended
    if approach == "uld":
        return [([i], [i], True) for i in range(min(n_s, n_t))]
    pairs = []
    for a, b in spans(char_ends(student_tok, body_s), char_ends(teacher_tok, body_t)):
        same = len(a) == len(b) and student_tok.convert_ids_to_tokens([body_s[i] for i in a]) == \
            teacher_tok.convert_ids_to_tokens([body_t[j] for j in b])
        if same and len(a) > 1:  # the same tokens on both sides (pieces of one character): one by one
            pairs += [([i], [j], True) for i, j in zip(a, b, strict=True)]
            continue
        # the last tokens continue the same text only if the earlier ones cover the same bytes
        # (" word" as one token against " ", "word": the teacher's "word" is not the student's)
        before_s, before_t = _known_bytes(student_tok, [body_s[i] for i in a[:-1]]), \
            _known_bytes(teacher_tok, [body_t[j] for j in b[:-1]])
        pairs.append((list(a), list(b), before_s is not None and before_s == before_t))
    if ended:
        pairs.append(([len(body_s)], [len(body_t)], True))
    return pairs


def _known_bytes(tok, ids: list[int]) -> bytes | None:
    """The bytes ``ids`` stand for, or None where the text does not tell them: the decoding of a
    piece of a character is U+FFFD whatever its bytes (E6 and E6 97 both decode to it), so two
    such prefixes would look alike."""
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return None if "\ufffd" in text else text.encode()


def matched_tokens(student_tok, teacher_tok) -> tuple[list[int], list[int]]:
    """The token pairs the span loss compares directly: the ordinary tokens whose string is the same
    in both vocabularies (special and added tokens are not text: a padding token of one side may
    share a string with the other's end of text), and the two ends of text with each other."""
    if student_tok.get_vocab() == teacher_tok.get_vocab():  # one vocabulary: every token is itself
        ids = sorted(set(student_tok.get_vocab().values()) & set(range(len(student_tok))))
        return ids, list(ids)
    specials_s = set(student_tok.all_special_ids) | {student_tok.eos_token_id}
    specials_t = set(teacher_tok.all_special_ids) | {teacher_tok.eos_token_id}
    vocab_s = {k: v for k, v in student_tok.get_vocab().items() if v not in specials_s and v < len(student_tok)}
    vocab_t = {k: v for k, v in teacher_tok.get_vocab().items() if v not in specials_t and v < len(teacher_tok)}
    ms, mt = matched_ids(vocab_s, vocab_t)
    return [*ms, student_tok.eos_token_id], [*mt, teacher_tok.eos_token_id]


class Aligned:
    """What a teacher with another tokenizer adds, live or served: the teacher's sequences and
    the alignment tensors of every micro-batch (:meth:`inputs`)."""

    def _align(self, accelerator, student_tok, teacher_tok, approach: str) -> None:
        self.student_tok, self.teacher_tok, self.approach = student_tok, teacher_tok, approach
        self.matched = tuple(torch.tensor(ids) for ids in matched_tokens(student_tok, teacher_tok))
        self.width = len(teacher_tok)  # padded embedding rows are not tokens
        for line in lossless_problems(student_tok, teacher_tok):
            raise UserError(line)
        self._aligned: dict[tuple, tuple] = {}  # per sequence: the dataset's are seen every epoch
        if accelerator.is_main_process:
            log.info("teacher with another tokenizer (%d tokens, %d of them also the student's): loss.cross_tokenizer=%s",
                     len(teacher_tok), len(self.matched[0]), approach)

    def _sequence(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> tuple:
        key = (tuple(prompt_ids), tuple(response_ids))
        if key not in self._aligned:
            prompt, body_t, ended = teacher_tokens(self.student_tok, self.teacher_tok, prompt_ids, response_ids)
            body_s = list(response_ids[:-1] if ended else response_ids)
            pairs = alignment(self.approach, self.student_tok, self.teacher_tok, body_s, body_t, ended)
            response = body_t + ([self.teacher_tok.eos_token_id] if ended else [])
            if len(self._aligned) > 200_000:
                self._aligned.clear()
            self._aligned[key] = (prompt, response, pairs)
        return self._aligned[key]

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        """The teacher's sequences (``x_input_ids``, ``x_attention_mask``, ``x_targets``, right-padded)
        and, in the student's positions [B, Ts], where each compared teacher row is (``x_pos``, -1
        elsewhere), where each span starts on both sides (``x_first_s``, ``x_first_t``), and whether
        its last tokens continue the same text (``x_direct``: else only the sorted comparison applies)."""
        rows = [self._sequence(e.prompt_ids, e.response_ids) for e in examples]
        t_len = max(len(p) + len(r) for p, r, _ in rows)
        s_len = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
        pad = self.teacher_tok.pad_token_id if self.teacher_tok.pad_token_id is not None else self.teacher_tok.eos_token_id
        ids = torch.full((len(rows), t_len), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t_len), dtype=torch.long)
        targets = torch.full((len(rows), t_len), IGNORE_INDEX, dtype=torch.long)
        pos, first_s, first_t = (torch.full((len(rows), s_len), -1, dtype=torch.long) for _ in range(3))
        direct = torch.zeros((len(rows), s_len))
        for b, ((prompt, response, pairs), e) in enumerate(zip(rows, examples, strict=True)):
            seq = prompt + response
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            targets[b, len(prompt) - 1:len(seq) - 1] = torch.tensor(response, dtype=torch.long)
            ps, pt = len(e.prompt_ids) - 1, len(prompt) - 1  # the positions that predict response token 0
            for a, c, same_text in pairs:
                direct[b, ps + a[-1]] = float(same_text)
                pos[b, ps + a[-1]] = pt + c[-1]
                first_s[b, ps + a[-1]] = ps + a[0]
                first_t[b, ps + a[-1]] = pt + c[0]
        return {"x_input_ids": ids, "x_attention_mask": mask, "x_targets": targets, "x_pos": pos,
                "x_first_s": first_s.clamp_min(0), "x_first_t": first_t.clamp_min(0), "x_direct": direct,
                "x_matched_s": self.matched[0], "x_matched_t": self.matched[1]}

    def fusable(self, engine: torch.nn.Module) -> str:
        return "a teacher with another tokenizer (loss.cross_tokenizer)"


class CrossTeacher(Aligned, LiveTeacher):
    """A frozen teacher in this process whose tokenizer is not the student's."""

    kind = "cross"

    def __init__(self, accelerator, vocab: int | None, model: torch.nn.Module, student_tok, teacher_tok,
                 approach: str):
        super().__init__(accelerator, vocab, model)  # vocab: the student's width (its padded rows cut)
        self._align(accelerator, student_tok, teacher_tok, approach)

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        """The teacher's logits on its own sequences: ``[B, Tt, Vt]``."""
        with torch.no_grad(), self.accelerator.autocast() if autocast else nullcontext():
            return logits_of(self.module, {"input_ids": batch["x_input_ids"],
                                           "attention_mask": batch["x_attention_mask"]}, self.width)

    def evaluated(self):
        """The teacher and its own tokenizer: it answers the test prompts in its tokens."""
        model = super().evaluated()
        return None if model is None else (model, self.teacher_tok)


class ServedCrossTeacher(Aligned, ServerTeacher):
    """A teacher with another tokenizer behind an inference server (``teacher.source=server``,
    ``teacher=`` naming its tokenizer): each micro-batch's teacher sequences are scored by the
    server (``prompt_logprobs``), and their top-k log-probabilities plus the rest of the mass
    spread evenly (:class:`kdexp.losses.fused.Sparse`) stand for the teacher's distributions at
    the response positions, where the cross-tokenizer losses read them."""

    kind = "server-cross"

    def __init__(self, accelerator, vocab: int | None, client, top_k: int, student_tok, teacher_tok, approach: str,
                 concurrency: int):
        super().__init__(accelerator, client, top_k, None, teacher_tok, concurrency)
        self._align(accelerator, student_tok, teacher_tok, approach)
        self.vocab = vocab  # the student's width (its padded rows cut); the teacher's rows are its own

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        batch = Aligned.inputs(self, examples)
        rows = [self._sequence(e.prompt_ids, e.response_ids) for e in examples]
        ids, values, rest = self.score([p + r for p, r, _ in rows], [len(p) for p, _, _ in rows])
        return {**batch, "server_ids": ids, "server_logprobs": values, "server_rest": rest}

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        """The teacher's logits on its own sequences, ``[B, Tt, Vt]``, at its response positions."""
        mask = batch["x_targets"] != IGNORE_INDEX
        fill = tail_logit(batch["server_rest"], self.width, self.top_k)
        return Sparse(batch["server_ids"], batch["server_logprobs"], fill, self.width, mask).logits()

    def fused_distributions(self, batch: dict[str, torch.Tensor]):
        raise RuntimeError("a teacher with another tokenizer takes the plain path")
