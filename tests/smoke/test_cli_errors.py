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


def test_the_command_line_contract_as_a_program(tmp_path):
    """The rest of the suite runs the command line in-process; here it is a real program: a
    config error is one `kdexp: error:` line per problem, exit status 2, no traceback, and
    nothing written."""
    proc = kdexp("train", "loss=fk1", "train.max_step=3", cwd=tmp_path, check=False, own_process=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdexp: error:")]
    assert proc.returncode == 2 and len(errors) == 2, proc.stderr[-2000:]
    assert "did you mean 'fkl'" in errors[0] and "did you mean 'train.max_steps'" in errors[1]
    assert "Traceback" not in proc.stderr + proc.stdout and not any(tmp_path.iterdir())
