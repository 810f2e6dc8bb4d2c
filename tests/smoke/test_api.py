"""kdexp.api.run: a command in the current process, with the command line's checks and records."""

from __future__ import annotations

import os

import pytest

from kdexp import api
from kdexp.errors import UserError
from tests.conftest import FAST

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]


def test_train_then_eval_in_process(tmp_path):
    cwd, threads = os.getcwd(), __import__("torch").get_num_threads()
    results = api.run("train", [*FAST, "method=sft", "train.num_threads=1", "hydra.run.dir=run"], cwd=tmp_path)
    assert results["train"]["steps"] == 6 and 0 <= results["rougeL"] <= 100
    run = tmp_path / "run"
    for name in ("config.yaml", "results.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "train.log",
                 "final/model.safetensors"):
        assert (run / name).exists(), name
    evaluated = api.run("eval", [str(run), "hydra.run.dir=eval", "logger=none"], cwd=tmp_path)
    assert evaluated["rougeL"] == results["rougeL"] and evaluated["n"] == results["student"]["n"]
    # The call changed nothing around it.
    assert os.getcwd() == cwd and __import__("torch").get_num_threads() == threads


def test_a_config_error_raises_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="unknown loss option 'fk1'; did you mean 'fkl'"):
        api.run("train", ["loss=fk1"], cwd=tmp_path)
    with pytest.raises(UserError, match="unknown command 'trian'"):
        api.run("trian", [], cwd=tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_error_inside_the_job_removes_the_run_directory_it_created(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n' * 30)
    with pytest.raises(UserError, match="missing field 'output'"):
        api.run("train", [*FAST, "data=jsonl", "data.path=bad.jsonl", "data.split.valid=4", "data.split.test=4"],
                cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
