"""Several teachers (`teachers.rule`) end to end on the bundled models: each rule reduces to the
one teacher where it must, and the relative target has a known answer at the first step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, kdexp

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

DATA = ["data.toy.n_train=96", "data.toy.n_valid=16", "data.toy.n_test=12"]
ARGS = [*FAST, *DATA, "method=kd", "train.max_steps=2", "train.log_every=1", "eval.max_samples=2", "eval.seeds=[10]"]
FAMILIES = "{" + ", ".join(f"{f}: tiny" for f in ("repeat", "fact", "arith", "category", "count", "reverse", "describe", "story")) + "}"


def losses(run) -> list[float]:
    return [json.loads(line)["train/fkl"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_rule_over_one_teacher_twice_is_that_teacher(tmp_path):
    """A mixture of a teacher with itself, the relative target at alpha 0, and routing every
    family to it train exactly as the teacher alone."""
    kdexp("train", *ARGS, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    want = losses(tmp_path / "one")
    for name, extra in (("mixture", ["teachers.rule=mixture", "teachers.names=[tiny,tiny]", "teachers.weights=[0.3,0.7]"]),
                        ("relative", ["teachers.rule=relative", "teachers.names=[tiny,tiny]", "teachers.alpha=0"]),
                        ("route", ["teachers.rule=route", "teachers.names=[tiny]", "teachers.route_key=family",
                                   f"teachers.route_map={FAMILIES}"])):
        kdexp("train", *ARGS, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert losses(tmp_path / name) == pytest.approx(want, rel=1e-5, abs=1e-6), name


def test_the_relative_target_of_a_teacher_against_itself_is_the_raw_student(tmp_path):
    """relative with the fine-tuned and raw teacher the same model and alpha 1: the target is
    p * (q_raw / p) = q_raw, the student as loaded, so the first step's divergence is 0."""
    kdexp("train", *ARGS, "teachers.rule=relative", "teachers.names=[tiny,tiny]", "teachers.alpha=1",
          f"hydra.run.dir={tmp_path / 'rel'}", cwd=tmp_path)
    first, second = losses(tmp_path / "rel")
    assert first == pytest.approx(0.0, abs=1e-5) and second > first


def test_mot_trains_each_teachers_branch_and_resumes_inside_a_round_to_the_same_weights(tmp_path):
    """teachers.rule=mot through the CLI: branches alternate by teachers.branch_steps; a run
    resumed from a checkpoint in the middle of a round (its base and branch sum in it) ends with
    the uninterrupted run's weights."""
    import shutil

    from safetensors.torch import load_file

    from kdexp import checkpoint

    args = [*ARGS, "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=10", "teachers.rule=mot",
            "teachers.names=[tiny-b,tiny-c]", "teachers.branch_steps=1", "eval.max_samples=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    kdexp("train", *args, f"hydra.run.dir={whole}", cwd=tmp_path)
    branches = [json.loads(line)["method/mot_branch"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert branches == [0, 1, 0, 1]
    shutil.copytree(whole, cut)
    for saved in checkpoint.list_checkpoints(cut)[1:]:  # keep step 1's: the second branch of round 1 is next
        shutil.rmtree(saved)
    shutil.rmtree(cut / "final")
    kdexp("train", *args, "train.resume=true", f"hydra.run.dir={cut}", cwd=tmp_path)
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (whole, cut))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    logged = [[{k: v for k, v in json.loads(line).items() if k in ("step", "train/fkl", "train/lr", "method/mot_branch")}
               for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, cut)]
    assert logged[0] == logged[1] and logged[0][2]["method/mot_branch"] == 0  # the resumed steps' teachers and losses


def test_cached_teachers_among_several(tmp_path):
    """A teachers.names entry cache:NAME reads that teacher's top-k cache (built at temperature 1):
    a mixture of one cached teacher with itself trains exactly as teacher.source=cache, and a
    missing cache is one line that says how to build it."""
    args = [*ARGS, "teacher.top_k=8", "loss.temperature=1"]
    missing = kdexp("train", *args, "teachers.rule=mixture", "teachers.names=[cache:tiny-c,tiny-b]",
                    f"hydra.run.dir={tmp_path / 'none'}", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "teachers.names entry cache:tiny-c: no cache" in missing.stderr
    assert "kdexp cache-teacher teacher=tiny-c loss.temperature=1 teacher.top_k=8" in missing.stderr
    kdexp("cache-teacher", *DATA, "teacher=tiny-c", "loss.temperature=1", "teacher.top_k=8", "logger=none",
          f"hydra.run.dir={tmp_path / 'cache'}", cwd=tmp_path)
    kdexp("train", *args, "teacher=tiny-c", "teacher.source=cache", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    kdexp("train", *args, "teachers.rule=mixture", "teachers.names=[cache:tiny-c,cache:tiny-c]",
          f"hydra.run.dir={tmp_path / 'mix'}", cwd=tmp_path)
    assert losses(tmp_path / "mix") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    gkd = kdexp("train", *args, "method=gkd", "teachers.rule=mixture", "teachers.names=[cache:tiny-c,tiny-b]",
                f"hydra.run.dir={tmp_path / 'gkd'}", cwd=tmp_path, check=False)
    assert gkd.returncode == 2 and "a cache: entry of teachers.names serves methods" in gkd.stderr
