"""Every paper setup in conf/experiment/ runs: each preset with its models swapped for the bundled
tiny ones, two steps, on small local copies of its data (Dolly, MiniLLM's evaluation sets,
a pre-training corpus), so that nothing but the model size and the data differ from the real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdexp.data import toy
from tests.conftest import ROOT, kdexp, read_json

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# One preset trains under its DeepSpeed stage (ZeRO-3, the one that partitions the models), in a
# process of its own (DeepSpeed's state outlives a run); the other presets train in this process
# without it (~deepspeed). Every stage trains in tests/smoke/test_sharded.py, and every preset's
# stage is composed below and by test_every_job_of_a_presets_grid_is_valid.
DEEPSPEED_RUNS = {"llama2_13b_llama68m"}
TINY = {"student": "student.name_or_path=${kdexp.asset:tiny-student}",
        "teacher": "teacher.name_or_path=${kdexp.asset:tiny-teacher}"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """dolly.jsonl (Dolly's fields), MiniLLM's evaluation-set layout under eval/, corpus.jsonl."""
    root = tmp_path_factory.mktemp("experiment-data")
    splits = toy.make_splits(seed=3, n_train=1040, n_valid=4, n_test=4)
    examples = [e for split in splits.values() for e in split]
    with (root / "dolly.jsonl").open("w") as f:
        for e in examples:
            f.write(json.dumps({"instruction": e.instruction, "context": e.input, "response": e.output,
                                "category": e.family}) + "\n")
    for sub in ("self-inst", "vicuna", "sinst/11_"):
        path = root / "eval" / sub / "valid.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"prompt": e.instruction + "<n>", "output": [e.output]}) + "\n"
                                for e in examples[:3]))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": e.output}) + "\n" for e in examples[:64]))
    return root


def test_every_preset_is_listed_in_docs():
    doc = (ROOT / "docs" / "experiments.md").read_text()
    missing = [p for p in PRESETS if f"experiment={p}" not in doc]
    assert not missing, f"docs/experiments.md has no launch command for {missing}"
    assert len(PRESETS) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_with_tiny_models(preset, compose, data, tmp_path):
    cfg = compose([f"experiment={preset}"])
    swap = ["student=tiny", TINY["student"], "student.dtype=float32"]
    if cfg.teacher.name_or_path:  # presets with a teacher get the tiny one
        swap += ["teacher=tiny", TINY["teacher"], "teacher.dtype=float32"]
    if cfg.method.name == "minillm":  # its pre-training corpus, a local file
        swap.append(f"method.pt_data={data / 'corpus.jsonl'}")
    deepspeed = cfg.get("deepspeed") is not None and preset in DEEPSPEED_RUNS
    if not deepspeed:
        swap.append("~deepspeed")
    run = tmp_path / "run"
    proc = kdexp("train", f"experiment={preset}", *swap, "train.epochs=null", "train.max_steps=2",
          f"data.path={data / 'dolly.jsonl'}", f"eval.data_dir={data / 'eval'}",
          "data.max_new_tokens=8", "eval.max_new_tokens=8", "eval.max_samples=2", "eval.seeds=[10]",
          # two steps: no validation (DistiLLM's runs one before training) and no teacher's score
          "train.eval_every=0", "eval.teacher=false",
          "train.mixed_precision=no", "logger=none", f"hydra.run.dir={run}", cwd=tmp_path, timeout=600,
          own_process=deepspeed)
    saved = OmegaConf.load(run / "config.yaml")
    # the preset's own choices survive the swap: method, loss, learning rate, DeepSpeed stage, sets
    assert saved.method.name == cfg.method.name and saved.loss.name == cfg.loss.name
    assert saved.train.lr == cfg.train.lr and saved.train.batch_size == cfg.train.batch_size
    assert (saved.deepspeed or {}).get("stage") == ((cfg.deepspeed or {}).get("stage") if deepspeed else None)
    results = read_json(run / "results.json")
    assert results["train"]["steps"] == 2
    assert sorted(results["student"]["sets"]) == sorted(cfg.eval.sets)
    assert (run / "final" / "config.json").exists()
    if deepspeed:  # on CPU over gloo alone: DeepSpeed's shared-memory op is not compiled (~30 s)
        assert "shm_comm" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_a_presets_grid_is_valid(preset, compose):
    """``kdexp train -m experiment=NAME``: every job of the preset's grid passes the checks a run
    makes before loading anything (on one process)."""
    import itertools

    from kdexp.train import check_config

    cfg = compose([f"experiment={preset}"], hydra=True)
    params = cfg.hydra.sweeper.params or {}
    grid = list(itertools.product(*[[f"{key}={v}" for v in str(values).split(",")] for key, values in params.items()]))
    assert len(grid) >= 1
    for job in grid:
        job_cfg = compose([f"experiment={preset}", *job])
        # minillm's corpus is the user's file (its preset requires it)
        problems = [p for p in check_config(job_cfg)[0] if not p.startswith("method.pt_data")]
        assert problems == [], (preset, job, problems)
