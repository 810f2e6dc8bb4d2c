"""Tokenization, length limits and batching.

Prompt and response are tokenized separately and concatenated, so the boundary is exact:
``prompt_ids`` (with the tokenizer's own special tokens, e.g. a BOS) + ``response_ids``
(+ EOS unless the response was cut by ``max_length``). Training batches are right-padded with
*shifted* targets; generation batches are left-padded prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdexp.data.sources import on_error_policy
from kdexp.errors import UserError
from kdexp.losses.objective import IGNORE_INDEX, ORIGINS

log = logging.getLogger(__name__)

TOO_LONG = ("truncate", "cut_end", "skip", "error")


@dataclass
class Example:
    """A prompt and a response. Generated responses carry where they came from (``origin``,
    one of ``ORIGINS``) and per-response-token values (``values``, e.g. the sampler's
    log-probabilities) that reach the loss aligned with the targets.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    record: dict[str, Any] = field(repr=False)
    origin: str = "data"
    values: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def with_response(self, response_ids: list[int], origin: str,
                      values: dict[str, list[float]] | None = None) -> Example:
        return Example(self.prompt_ids, list(response_ids), self.record, origin, dict(values or {}))


def encode(records: Sequence[Mapping[str, Any]], tokenizer, cfg: Mapping[str, Any],
           split: str) -> list[Example]:
    """Tokenize ``records`` under ``data.max_prompt_length`` / ``max_length`` / ``too_long``.

    A prompt longer than ``max_prompt_length`` is cut to its last tokens (``truncate``: the
    template's "### Response:" marker is at the end; the special tokens the tokenizer puts in
    front, a BOS, stay in front), to its first tokens (``cut_end``: what
    MiniLLM's evaluation does, ``prompt_ids[:max_prompt_length]`` in its PromptDataset), dropped
    (``skip``, MiniLLM's choice for Dolly's training data), or an error (``error``). A response is cut to fit ``max_length``; a cut response
    has no EOS, so the model is never taught to stop where the text did not. A prompt with no
    tokens is a bad row: an error, or dropped under ``data.on_error=skip``.
    """
    max_prompt, max_len, policy = cfg["max_prompt_length"], cfg["max_length"], cfg["too_long"]
    on_error = on_error_policy(cfg)
    if policy not in TOO_LONG:
        raise UserError(f"data.too_long must be one of {', '.join(TOO_LONG)}, got '{policy}'")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; kdexp needs one to end responses")
    lead = len(leading_special_tokens(tokenizer))
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    out, n_cut, n_skipped, n_empty, n_resp_cut = [], 0, 0, 0, 0
    for i, (record, p, r) in enumerate(zip(records, prompts, responses, strict=True)):
        if not p:
            if on_error == "fail":
                raise UserError(f"data '{cfg['name']}' ({split} split, record {i}): the prompt is empty "
                                f"(no tokens); fix the record or set data.on_error=skip")
            n_empty += 1
            continue
        if len(p) > max_prompt:
            if policy == "error":
                raise UserError(
                    f"data '{cfg['name']}' ({split} split, record {i}): the prompt has {len(p)} tokens, "
                    f"more than data.max_prompt_length={max_prompt}; set data.too_long=truncate or "
                    f"skip, or raise data.max_prompt_length")
            if policy == "skip":
                n_skipped += 1
                continue
            keep = min(lead, max_prompt - 1)  # the BOS stays, with the prompt's end after it
            p, n_cut = (p[:max_prompt] if policy == "cut_end" else p[:keep] + p[len(p) - (max_prompt - keep):]), n_cut + 1
        room = max(0, max_len - len(p))
        # a record whose source cut its response (``ended: false``: the known chain's responses
        # at their maximum length) gets no EOS: the text did not end there
        r = list(r) + ([] if record.get("ended") is False else [tokenizer.eos_token_id])
        if len(r) > room:
            r, n_resp_cut = r[:room], n_resp_cut + 1
        out.append(Example(list(p), r, dict(record)))
    if n_cut or n_skipped or n_empty or n_resp_cut:
        log.warning("data %s/%s: %d prompts truncated and %d skipped (longer than %d tokens), "
                    "%d skipped as empty, %d responses cut at max_length=%d", cfg["name"], split,
                    n_cut, n_skipped, max_prompt, n_empty, n_resp_cut, max_len)
    if not out:
        raise UserError(f"data '{cfg['name']}': the {split} split is empty: of its {len(records)} "
                        f"records, {n_skipped} were longer than data.max_prompt_length={max_prompt} "
                        f"(data.too_long=skip) and {n_empty} had an empty prompt (data.on_error=skip)")
    return out


def leading_special_tokens(tokenizer) -> list[int]:
    """The tokens the tokenizer puts in front of every text (LLaMA's BOS; none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return full[:start]


def collate_train(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` [B, T] and shifted ``targets`` [B, T].

    ``targets[b, t]`` is the token at t + 1 when it belongs to the response, else IGNORE_INDEX:
    the prompt, the padding and the last position are never trained on. ``origin`` [B] is the
    index of each example's origin in ``ORIGINS``; every per-token value ``v`` of the examples
    becomes ``value_v`` [B, T], aligned with ``targets`` (0 elsewhere).
    """
    length = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        p = len(e.prompt_ids)
        targets[b, p - 1 : len(seq) - 1] = torch.tensor(e.response_ids, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets,
             "origin": torch.tensor([ORIGINS.index(e.origin) for e in examples])}
    for key in sorted({k for e in examples for k in e.values}):
        values = torch.zeros((len(examples), length), dtype=torch.float32)
        for b, e in enumerate(examples):
            if key in e.values:
                p = len(e.prompt_ids)
                values[b, p - 1 : p - 1 + len(e.response_ids)] = torch.tensor(e.values[key])
        batch[f"value_{key}"] = values
    return batch


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned: ``(ids, attention_mask)`` [B, max length], padded on the left."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[b, length - len(row):] = 1
    return ids, mask


def collate_prompts(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``input_ids`` / ``attention_mask`` [B, P]."""
    ids, mask = left_padded([e.prompt_ids for e in examples], pad_id)
    return {"input_ids": ids, "attention_mask": mask}
