"""The validation loss two ways (per token, MiniLLM's per sequence) and the eval-sets table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdexp.data.encode import Example
from kdexp.evaluation import teacher_forced_nll

V = 5


class Fixed(torch.nn.Module):
    """Next-token logits that depend only on the sequence's first token: row b predicts with
    logits [first_b, 0, 0, 0, 0], so each sequence has its own per-token NLL."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., 0] = input_ids[:, :1].float()
        return SimpleNamespace(logits=logits)


def nll(first: int, token: int) -> float:
    z = [float(first)] + [0.0] * (V - 1)
    return -(z[token] - math.log(sum(math.exp(v) for v in z)))


def test_token_mean_and_sequence_mean_against_a_hand_computation():
    examples = [Example([3, 1], [0, 2, 4], {}), Example([1, 1], [2], {})]  # 3 and 1 response tokens
    per_seq = [[nll(3, t) for t in (0, 2, 4)], [nll(1, 2)]]
    token_mean = sum(map(sum, per_seq)) / 4
    sequence_mean = (sum(per_seq[0]) / 3 + per_seq[1][0]) / 2
    assert token_mean != pytest.approx(sequence_mean)
    for batch_size in (1, 2):
        assert teacher_forced_nll(Fixed(), examples, pad_id=4, batch_size=batch_size) == pytest.approx(token_mean)
        assert teacher_forced_nll(Fixed(), examples, pad_id=4, batch_size=batch_size,
                                  per="sequence") == pytest.approx(sequence_mean)
    with pytest.raises(ValueError, match="per must be"):
        teacher_forced_nll(Fixed(), examples, pad_id=4, per="batch")


def test_sets_table_has_a_row_per_set_and_the_average():
    from kdexp.jobs import sets_table

    row = {"n": 3, "rougeL": 10.0, "rougeL_std": 1.0, "exact_match": 0.0, "exact_match_std": 0.0,
           "loss": 2.0, "gen_length": 4.0, "gen_length_max": 9, "hit_max_new_tokens": 12.5, "seeds": [10, 20]}
    table = sets_table("m", {"a": row, "b": {**row, "rougeL": 30.0, "loss": 4.0}}, "minillm")
    lines = table.splitlines()
    assert lines[0] == "### m, eval=minillm"
    assert lines[4].startswith("| a | 3 | 10.00 ± 1.00 |") and lines[5].startswith("| b | 3 | 30.00 ± 1.00 |")
    assert lines[4].endswith("| 4.0 / 9 | 12.5 % | 2 |")   # the share of responses cut at max_new_tokens
    assert lines[6].startswith("| **average** | | 20.00 | 0.00 | 3.000 |")
    assert "average" not in sets_table("m", {"a": row}, "default")


def test_one_seed_has_no_spread_to_print():
    from kdexp.evaluation.evaluate import format_table, mean_std
    from kdexp.jobs import sets_table

    assert mean_std(70.214, 0.0, 1) == "70.21" and mean_std(70.214, 0.5, 3) == "70.21 ± 0.50"
    row = {"n": 3, "rougeL": 10.0, "rougeL_std": 0.0, "exact_match": 5.0, "exact_match_std": 0.0,
           "loss": 2.0, "gen_length": 4.0, "gen_length_max": 9, "hit_max_new_tokens": 0.0, "seeds": [10]}
    assert "±" not in sets_table("m", {"a": row}, "default") and "±" not in format_table({"student": row})
