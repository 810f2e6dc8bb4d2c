"""User-facing errors: one line that says what was wrong and how to fix it.

The CLI prints ``kdexp: error: <line>`` for each line of a ``UserError`` (several problems
found at once are one line each) and exits with status 2; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input (config, data, paths): reported as one line, no traceback, exit status 2."""

    status = 2


class TrainingAborted(UserError):
    """The run cannot go on (e.g. too many consecutive non-finite steps): exit status 3; its
    checkpoints stay as they were."""

    status = 3


class Stopped(UserError):
    """A signal (SIGTERM, SIGUSR1) stopped the run after a checkpoint: exit status 128 + the
    signal's number, the shell's convention for "terminated by a signal"."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` did you mean 'x'?`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


def unknown_choice(kind: str, word: str, choices: Iterable[str]) -> UserError:
    """The error for a name that is not among ``choices``, with the closest match."""
    choices = sorted(str(c) for c in choices)
    hint = did_you_mean(word, choices)
    return UserError(f"unknown {kind} '{word}';{hint} choices: {', '.join(choices)}")


class Problems(list):
    """Every problem found before any compute is spent, reported together (one line each).

        problems = Problems(config.problems(cfg))
        with problems.check():
            plan = methods.build(cfg)       # a UserError is recorded, not raised
        problems.raise_if_any()

    A problem about a config key already reported (its first word, e.g. ``train.lr``) is not
    repeated when a later check reaches the same key.
    """

    def add(self, line: str) -> None:
        key = line.split(" ", 1)[0]
        if "." in key and any(p.split(" ", 1)[0] == key for p in self):
            return
        self.append(line)

    @contextmanager
    def check(self, consequences: bool = False) -> Iterator[None]:
        """Record a ``UserError`` raised inside. ``consequences``: other exceptions are
        swallowed too when problems were already found (a check that ran on a config already
        known to be wrong may fail in any way)."""
        try:
            yield
        except UserError as err:
            for line in str(err).splitlines():
                self.add(line)
        except Exception:
            if not (consequences and self):
                raise

    def raise_if_any(self) -> None:
        if self:
            raise UserError("\n".join(self))
