"""The loop's guarantees end to end: accumulation is exact, multirun, W&B offline, hub-style data."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.conftest import FAST, kdexp, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 as 1 x 8 or as 4 micro-batches of 2: the same updates (global token normalization).

    The toy responses have different lengths, so a per-micro-batch mean would weight tokens
    differently and the weights would drift apart.
    """
    common = [*FAST, "train.max_steps=3", "train.batch_size=8", "train.max_grad_norm=0",
              "eval.max_samples=2", "eval.seeds=[10]"]
    kdexp("train", *common, "train.micro_batch_size=8", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    kdexp("train", *common, "train.micro_batch_size=2", f"hydra.run.dir={tmp_path / 'four'}", cwd=tmp_path)
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    four = load_file(str(tmp_path / "four" / "final" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(one[name], four[name], rtol=1e-4, atol=1e-5, msg=name)
    first_one, first_four = (json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])
                             for run in ("one", "four"))
    assert first_one["train/loss"] == pytest.approx(first_four["train/loss"], rel=1e-5)


def test_multirun_gives_each_job_its_own_record(tmp_path):
    kdexp("train", "-m", *FAST, "method=sft,kd", "eval.max_samples=2", "eval.seeds=[10]",
          f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    jobs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(jobs) == 2
    assert {OmegaConf.load(p.parent / "config.yaml").method.name for p in jobs} == {"sft", "kd"}


def test_wandb_logs_offline_without_an_api_key(tmp_path):
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": str(tmp_path / "no-netrc"),
           "HOME": str(tmp_path)}
    run = tmp_path / "run"
    kdexp("train", *[a for a in FAST if not a.startswith("logger")], "logger=wandb",
          "logger.group=smoke", "eval.max_samples=2", "eval.seeds=[10]", f"hydra.run.dir={run}",
          cwd=tmp_path, env=env)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and (run / "wandb_id.txt").read_text().strip() in offline[0].name


def test_dolly_through_the_datasets_loader(tmp_path):
    """data=dolly read by `datasets.load_dataset` (the hub code path) from a local folder."""
    folder = tmp_path / "dolly"
    folder.mkdir()
    rows = [{"instruction": f"Name color {i}.", "context": "Sky" if i % 2 else "",
             "response": f"Blue {i}.", "category": "open_qa"} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    kdexp("train", *FAST, "data=dolly", f"data.hub_id={folder}", "data.split.valid=4",
          "data.split.test=4", "eval.max_samples=2", "eval.seeds=[10]", "eval.max_new_tokens=8",
          f"hydra.run.dir={run}", cwd=tmp_path)
    results = read_json(run / "results.json")
    assert results["student"]["n"] == 2
    prompts = [json.loads(x)["prompt"] for x in (run / "generations" / "test_student.jsonl").read_text().splitlines()]
    assert all(p.startswith("Below is an instruction that describes a task") for p in prompts)
    assert all(p.endswith("### Response:\n") for p in prompts)


def test_eval_of_a_preset_and_of_a_model_directory(tmp_path):
    """`kdexp eval model=PRESET` and `model=DIR` go through the same loader as training."""
    common = ["eval.max_samples=4", "eval.seeds=[10]", "data.toy.n_test=4", "logger=none"]
    kdexp("eval", "model=tiny", *common, f"hydra.run.dir={tmp_path / 'preset'}", cwd=tmp_path)
    preset = read_json(tmp_path / "preset" / "results.json")
    assert preset["model"] == "teacher=tiny" and preset["n"] == 4
    from kdexp.models import asset_path

    kdexp("eval", f"model={asset_path('tiny-teacher')}", *common, f"hydra.run.dir={tmp_path / 'dir'}",
          cwd=tmp_path)
    direct = read_json(tmp_path / "dir" / "results.json")
    assert (direct["rougeL"], direct["exact_match"], direct["loss"]) == \
        (preset["rougeL"], preset["exact_match"], preset["loss"])
