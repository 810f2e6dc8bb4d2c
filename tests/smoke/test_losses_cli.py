"""Every divergence of the loss= group, end to end through `kdexp train` on the embedded default."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from kdexp import losses
from tests.conftest import FAST, kdexp

pytestmark = pytest.mark.slow


def _train_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line]


def test_every_loss_trains_end_to_end(tmp_path):
    # One multirun over all names: one process, one job per divergence.
    kdexp("train", "-m", *FAST, "train.max_steps=2", "train.save_every=0", "train.eval_every=0",
          "eval.max_samples=2", "eval.seeds=[10]", "eval.teacher=false", "method.kd_weight=0.5",
          f"loss={','.join(losses.names())}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    jobs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert {OmegaConf.load(p.parent / "config.yaml").loss.name for p in jobs} == set(losses.names())
    for job in jobs:
        loss = OmegaConf.load(job.parent / "config.yaml").loss.name
        last = _train_records(job.parent)[-1]
        assert last[f"train/{loss}"] >= 0 and last["train/ce"] > 0, loss


def test_parameters_adaptive_weight_sample_weight_and_chunks(tmp_path):
    run = tmp_path / "run"
    kdexp("train", *FAST, "loss=jsd", "loss.beta=0.9", "loss.chunk_size=7", "method.kd_weight=adaptive",
          "method.sample_weight=teacher_likelihood", "eval.max_samples=2", "eval.seeds=[10]",
          f"hydra.run.dir={run}", cwd=tmp_path)
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.loss.beta == 0.9 and cfg.method.kd_weight == "adaptive"
    records = _train_records(run)
    # The first logged step already has an EMA (updated after step 1); the scale is CE / JSD.
    scales = [r["train/jsd_scale"] for r in records]
    assert all(s > 1 for s in scales)
    assert records[-1]["train/loss"] == pytest.approx(
        0.5 * records[-1]["train/ce"] + 0.5 * 4 * scales[-1] * records[-1]["train/jsd"], rel=1e-4)


def test_bad_loss_parameter_is_one_line(tmp_path):
    out = kdexp("train", *FAST, "loss=jsd", "loss.beta=1.5", f"hydra.run.dir={tmp_path / 'r'}",
                cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert "beta must be in [0, 1], got 1.5" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_the_fused_path_trains_the_weights_the_plain_path_trains(tmp_path):
    """Six optimizer steps of kd (a CE and a JSD term, two micro-batches a step): the fused
    path's final weights equal the plain path's to 1e-5 (float32 sums in another order)."""
    from safetensors.torch import load_file

    finals = {}
    for fused in ("auto", "false"):
        run = tmp_path / fused
        kdexp("train", *FAST, "loss=jsd", "loss.beta=0.3", "loss.temperature=2", "method.kd_weight=0.5",
              f"loss.fused={fused}", "train.save_every=0", "eval.max_samples=2", "eval.seeds=[10]",
              f"hydra.run.dir={run}", cwd=tmp_path)
        log = (run / "train.log").read_text()
        assert ("loss: fused" in log) == (fused == "auto"), log
        finals[fused] = load_file(run / "final" / "model.safetensors")
    assert finals["auto"].keys() == finals["false"].keys()
    for key, plain in finals["false"].items():
        torch.testing.assert_close(finals["auto"][key], plain, rtol=1e-5, atol=1e-5)
    curves = {f: [r["train/loss"] for r in _train_records(tmp_path / f)] for f in finals}
    assert curves["auto"] == pytest.approx(curves["false"], rel=1e-5)
    assert curves["false"][0] != curves["false"][-1]  # they trained: not two untouched models
