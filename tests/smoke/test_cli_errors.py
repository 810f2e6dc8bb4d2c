"""Bad input: one line on stderr, exit status 2, no traceback, no half-written run directory."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, kdexp

pytestmark = pytest.mark.slow


def assert_clean_failure(proc, cwd, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdexp: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    leftovers = [p for p in (cwd / "runs").rglob("*")] if (cwd / "runs").exists() else []
    assert leftovers == [], leftovers
    return lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(n, instruction="Say hi.", output="hi"):
    return [{"instruction": f"{instruction} {i}", "input": "", "output": output} for i in range(n)]


@pytest.mark.parametrize("args, needles", [
    (["method=gdk"], ["method option 'gdk'", "kd, sft"]),
    (["loss=fk1"], ["did you mean 'fkl'"]),
    (["train.max_step=5"], ["unknown option 'train.max_step'", "did you mean 'train.max_steps'"]),
    (["train.max_steps=0", "loss.temperature=-1"], ["train.max_steps must be", "loss.temperature must be"]),
    (["data.max_prompt_length=600"], ["must be smaller than data.max_length"]),
])
def test_config_mistakes(tmp_path, args, needles):
    assert_clean_failure(kdexp("train", *FAST, *args, cwd=tmp_path, check=False), tmp_path, *needles)


def test_unknown_command(tmp_path):
    proc = kdexp("trian", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "did you mean 'train'" in proc.stderr


def test_missing_data_file(tmp_path):
    proc = kdexp("train", *FAST, "data=jsonl", "data.path=nope.jsonl", cwd=tmp_path, check=False)
    assert_clean_failure(proc, tmp_path, "not found", "nope.jsonl")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(30))
    lines = path.read_text().splitlines()
    lines[6] = '{"instruction": "broken", '
    path.write_text("\n".join(lines) + "\n")
    proc = kdexp("train", *FAST, "data=jsonl", f"data.path={path}", cwd=tmp_path, check=False)
    assert_clean_failure(proc, tmp_path, "d.jsonl:7", "malformed")


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    proc = kdexp("train", *FAST, "data=jsonl", "data.path=empty.jsonl", cwd=tmp_path, check=False)
    assert_clean_failure(proc, tmp_path, "no records")


def test_prompt_longer_than_the_limit(tmp_path):
    rows = records(40)
    rows[3]["instruction"] = "word " * 400
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    proc = kdexp("train", *FAST, "data=jsonl", f"data.path={path}", "data.split.valid=5",
                 "data.split.test=5", cwd=tmp_path, check=False)
    assert_clean_failure(proc, tmp_path, "data.max_prompt_length=256", "data.too_long")


def test_unwritable_output_directory(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = kdexp("train", *FAST, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path, check=False)
    assert_clean_failure(proc, tmp_path, "not a directory")


def test_eval_without_a_model(tmp_path):
    proc = kdexp("eval", "logger=none", cwd=tmp_path, check=False)
    assert_clean_failure(proc, tmp_path, "model=")


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
