"""The CLI's help and config printing (bad input of every kind: tests/test_bad_inputs.py)."""

from __future__ import annotations

import pytest

from tests.conftest import kdexp

pytestmark = pytest.mark.slow


def test_help_lists_commands_and_group_choices(tmp_path):
    top = kdexp("--help", cwd=tmp_path).stdout
    for word in ("train", "eval", "generate", "method=", "loss=", "student=", "teacher=", "data=",
                 "amid, fkl, jsd, rkl", "gpt2-xl", "qwen2.5-7b", "dolly"):
        assert word in top, word
    train_help = kdexp("train", "--help", cwd=tmp_path).stdout
    assert "kdexp train" in train_help and "method: distillm, distillm2, gkd, gkd_rl, imitkd, kd, minillm, okd, seqkd, sft, sgo, taid" in train_help


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = kdexp("train", "method=sft", "loss=rkl", "--cfg", "job", cwd=tmp_path).stdout
    assert "name: sft" in out and "name: rkl" in out
    assert not (tmp_path / "runs").exists()
