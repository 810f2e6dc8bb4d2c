"""Prompt templates: ``(instruction, input) -> prompt``; the response follows the prompt directly.

``alpaca`` is the template of Alpaca as used by MiniLLM (Gu et al., ICLR 2024) and DistiLLM
(Ko et al., ICML 2024) for Dolly and the other instruction sets, including their "### Input:"
variant when a record has a non-empty input (Dolly's ``context``).
"""

from __future__ import annotations

from collections.abc import Callable

from kdexp.registry import Registry

TEMPLATES: Registry[Callable[[str, str], str]] = Registry("data.template")

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
COMPACT = "### Instruction:\n{instruction}\n\n### Response:\n"
COMPACT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@TEMPLATES.register("alpaca")
def alpaca(instruction: str, input: str) -> str:
    """The MiniLLM / DistiLLM prompt (with "### Input:" when there is an input)."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA.format(instruction=instruction)


@TEMPLATES.register("compact")
def compact(instruction: str, input: str) -> str:
    """``alpaca`` without the preamble sentence: half the tokens on short tasks (the toy task)."""
    if input:
        return COMPACT_WITH_INPUT.format(instruction=instruction, input=input)
    return COMPACT.format(instruction=instruction)


@TEMPLATES.register("none")
def none(instruction: str, input: str) -> str:
    """The instruction as is (a ready-made prompt), followed by the input on a new line if any."""
    return f"{instruction}\n{input}" if input else instruction
