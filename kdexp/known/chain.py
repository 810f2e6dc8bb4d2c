"""A known teacher for sequences: a random order-k Markov chain over a small vocabulary (no torch).

    chain = Chain.from_config(json.load(open("kdexp/assets/markov-teacher/config.json")))
    chain.probs((3, 7))                  # p(next | ..., 3, 7) over the vocabulary, EOS first
    chain.sample(random.Random(0))       # (prompt ids, response ids): a prompt and one continuation

Token 0 is EOS (also the pad and the "nothing before the start" context); tokens 1..states are
the chain's states, written ``t1 .. tN`` in text. A prompt is ``prompt_length`` states drawn
uniformly; the response follows the chain: at every step EOS with probability ``stop``, else a
state from ``softmax(sharpness * z)``, ``z`` standard normal, drawn once per context from
``seed``. Responses stop at EOS or after ``max_response`` tokens (then without EOS: the sequence
was cut, not ended). The same definition builds the teacher's weights
(:class:`kdexp.known.markov.MarkovLM`) and samples the ``data=markov`` task, so the data always
comes from the teacher in use.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

EOS = 0


def token_text(ids: Sequence[int]) -> str:
    """``[3, 7]`` -> ``"t3 t7"`` (EOS is never written)."""
    return " ".join(f"t{i}" for i in ids)


@dataclass(frozen=True)
class Chain:
    states: int = 12
    order: int = 2
    stop: float = 0.0625
    sharpness: float = 2.0
    seed: int = 0
    prompt_length: int = 2
    max_response: int = 48

    KEYS = ("states", "order", "stop", "sharpness", "seed", "prompt_length", "max_response")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Chain:
        """The chain a ``kdexp-markov`` model config describes (its ``chain_*`` keys)."""
        return cls(**{k: config[f"chain_{k}"] for k in cls.KEYS if f"chain_{k}" in config})

    def config(self) -> dict[str, Any]:
        return {f"chain_{k}": v for k, v in asdict(self).items()}

    @property
    def vocab(self) -> int:
        return self.states + 1

    @cached_property
    def table(self) -> list[list[float]]:
        """``table[c]``: the next-token probabilities after context ``c`` (the last ``order``
        tokens, oldest first, as a base-``vocab`` number: :meth:`context_index`)."""
        rng = random.Random(self.seed)
        rows = []
        for _ in range(self.vocab ** self.order):
            z = [self.sharpness * rng.gauss(0.0, 1.0) for _ in range(self.states)]
            top = max(z)
            w = [math.exp(v - top) for v in z]
            total = sum(w)
            rows.append([self.stop] + [(1.0 - self.stop) * v / total for v in w])
        return rows

    def context_index(self, context: Sequence[int]) -> int:
        """The row of :attr:`table` for the last ``order`` tokens of ``context`` (missing -> 0)."""
        last = [0] * max(0, self.order - len(context)) + list(context[max(0, len(context) - self.order):])
        index = 0
        for token in last:
            index = index * self.vocab + token
        return index

    def probs(self, context: Sequence[int]) -> list[float]:
        return self.table[self.context_index(context)]

    def sample(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """One prompt and the chain's continuation (ending with EOS unless cut at ``max_response``)."""
        prompt = [rng.randint(1, self.states) for _ in range(self.prompt_length)]
        seq, response = list(prompt), []
        while len(response) < self.max_response:
            token = rng.choices(range(self.vocab), weights=self.probs(seq))[0]
            response.append(token)
            if token == EOS:
                break
            seq.append(token)
        return prompt, response


def records(chain: Chain, n: int, seed: int | str) -> list[dict[str, Any]]:
    """``n`` samples of the chain as data records: ``prompt`` and ``output`` text (the output
    without its EOS: encoding adds it back; a cut response keeps no EOS)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, response = chain.sample(rng)
        ended = bool(response) and response[-1] == EOS
        text = token_text(response[:-1] if ended else response)
        out.append({"prompt": token_text(prompt), "output": text, "references": [text], "ended": ended})
    return out
