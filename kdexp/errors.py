"""User-facing errors: one line that says what was wrong and how to fix it.

The CLI prints ``kdexp: error: <message>`` and exits with status 2 for a ``UserError``;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input (config, data, paths): reported as one line, no traceback, exit status 2."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` did you mean 'x'?`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


def unknown_choice(kind: str, word: str, choices: Iterable[str]) -> UserError:
    """The error for a name that is not among ``choices``, with the closest match."""
    choices = sorted(str(c) for c in choices)
    hint = did_you_mean(word, choices)
    return UserError(f"unknown {kind} '{word}';{hint} choices: {', '.join(choices)}")
