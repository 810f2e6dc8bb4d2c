"""The parts of ``kdexp osd`` on hand-built inputs: the stream's order, the buffer policy, the
update's alignment, and the window arithmetic."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from kdexp import losses, osd
from kdexp.data.encode import Example
from kdexp.errors import UserError
from tests.unit.test_speculative import DRAFT, EOS, TARGET


class Bigram(torch.nn.Module):
    """A trainable bigram model: the next token's logits are the current token's row."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone().float())

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def queries(families: list[str]) -> list[Example]:
    return [Example([0], [], {"family": f, "i": i}) for i, f in enumerate(families)]


def settings(**kw) -> OmegaConf:
    base = {"gamma": 2, "max_new_tokens": 4, "temperature": 1.0, "buffer_size": 3, "update_every": 3,
            "positions": "rejected", "lr": 1e-2, "steps_per_update": 1}
    return OmegaConf.create({**base, **kw})


def test_a_drifting_stream_is_grouped_by_phase():
    ex = queries(["a", "b", "c", "a", "b", "c", "a"])
    stream, phase = osd.order_stream(ex, "drift", "family", [["b", "c"], ["a"]], seed=0)
    assert sorted(e.record["family"] for e in stream[:4]) == ["b", "b", "c", "c"]
    assert [e.record["family"] for e in stream[4:]] == ["a", "a", "a"] and phase == [0] * 4 + [1] * 3
    stream, phase = osd.order_stream(ex, "drift", "family", None, seed=0)  # one phase per value, sorted
    assert [e.record["family"] for e in stream] == ["a"] * 3 + ["b"] * 2 + ["c"] * 2 and phase == [0] * 3 + [1] * 2 + [2] * 2
    stream, phase = osd.order_stream(ex, "file", "family", None, seed=0)
    assert stream == ex and set(phase) == {0}
    stream, _ = osd.order_stream(ex, "shuffle", "family", None, seed=1)
    assert sorted(e.record["i"] for e in stream) == list(range(7)) and stream != ex
    with pytest.raises(UserError, match="did you mean 'a'"):
        osd.order_stream(ex, "drift", "family", [["b"], ["aa"]], seed=0)
    with pytest.raises(UserError, match="by their 'topic' field"):
        osd.order_stream(ex, "drift", "topic", None, seed=0)


def served_records(monkeypatch, o, n: int) -> list[list[int]]:
    """Which queries' records each update saw (``serve`` with ``update`` recorded, not run)."""
    seen: list[list[int]] = []

    def fake_update(draft, records, divergence, optimizer, steps, pad_id, vocab):
        seen.append([r.ids[-1] for r in records])  # the last token: set below to the query's number
        return 0.0

    monkeypatch.setattr(osd, "update", fake_update)
    counter = iter(range(n))

    def fake_sample(*args, **kwargs):
        i = next(counter)
        return SimpleNamespace(tokens=[100 + i], accepted=0, proposed=1, alpha=[0.5], target_calls=1, draft_calls=1,
                               rejected=[0] if i % 2 == 0 else [], target_logp=torch.zeros(1, 4))

    monkeypatch.setattr(osd, "speculative_sample", fake_sample)
    out = osd.serve(Bigram(DRAFT), Bigram(TARGET), queries(["a"] * n), o, None, True, [EOS], 5, None, 0)
    assert [u[0] for u in out["updates"]] == [k for k in range(o.update_every, n + 1, o.update_every)]
    return [[t - 100 for t in s] for s in seen]


def test_the_papers_buffer_uses_each_record_once(monkeypatch):
    """buffer_size == update_every: each update sees the queries since the last one (those
    with a rejected position), never an older one; queries without one still take a slot."""
    seen = served_records(monkeypatch, settings(buffer_size=3, update_every=3), 9)
    assert seen == [[0, 2], [4], [6, 8]]


def test_a_larger_buffer_replays_the_last_queries(monkeypatch):
    seen = served_records(monkeypatch, settings(buffer_size=6, update_every=3), 9)
    assert seen == [[0, 2], [0, 2, 4], [4, 6, 8]]


def test_the_update_distills_the_logits_that_predict_each_buffered_token():
    """A record of prompt [0] and response [1, 2] with position 2 (the token 2) teaches the row
    that predicts it: the draft's row of token 1, toward the target's row of token 1."""
    draft = Bigram(DRAFT)
    target_row = TARGET[1].float().log_softmax(-1)
    record = osd.Record([0, 1, 2], [2], target_row[None])
    fkl = losses.divergence("fkl")
    before = fkl(draft.table[1][None], target_row[None]).item()
    rows = draft.table.detach().clone()
    opt = torch.optim.SGD(draft.parameters(), lr=0.5)
    loss = osd.update(draft, [record], fkl, opt, 1, EOS, None)
    assert loss == pytest.approx(before, rel=1e-5)
    changed = (draft.table.detach() != rows).any(-1).tolist()
    assert changed == [False, True, False, False]  # only the row of token 1 moved
    assert fkl(draft.table[1][None], target_row[None]).item() < before


def test_window_rates():
    per_query = {"accepted": [1, 3, 0], "proposed": [2, 4, 0], "alpha": [1.0, 3.0, 0.0], "tokens": [4, 8, 1],
                 "target_calls": [2, 2, 1], "draft_calls": [2, 6, 0]}
    w = osd.windows(per_query, 2, cost_ratio=0.5)
    assert w["query"] == [2, 3]
    assert w["acceptance"][0] == pytest.approx(4 / 6) and math.isnan(w["acceptance"][1])
    assert w["tokens_per_call"] == pytest.approx([12 / 4, 1.0])
    assert w["speedup"] == pytest.approx([12 / (4 + 0.5 * 8), 1 / 1])
    row = osd.phase_summary(per_query, [0, 0, 1], 0.5)
    assert row["acceptance"] == pytest.approx(4 / 6) and row["phase1_acceptance"] == pytest.approx(4 / 6)
    assert math.isnan(row["phase2_acceptance"])
