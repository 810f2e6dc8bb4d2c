"""Every method on generated outputs, end to end through `kdexp train` on the bundled tiny
models, each checked for the behaviour that makes it that method."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import FAST, kdexp, read_json

pytestmark = pytest.mark.slow

NEW = ["seqkd", "gkd", "imitkd", "distillm", "sgo", "minillm", "distillm2", "taid", "gkd_rl"]
QUICK = [*FAST, "train.save_every=0", "eval.max_samples=4", "eval.seeds=[10]", "eval.teacher=false",
         "rollout.max_new_tokens=16"]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line]


def test_every_method_trains_end_to_end(tmp_path):
    kdexp("train", "-m", *QUICK, "train.eval_every=3", f"method={','.join(NEW)}",
          f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=900)
    runs = {OmegaConf.load(p.parent / "config.yaml").method.name: p.parent
            for p in (tmp_path / "sweep").glob("*/results.json")}
    assert set(runs) == set(NEW)
    last = {m: records(run)[-1] for m, run in runs.items()}
    # SeqKD: CE on teacher outputs, generated once into the cache.
    assert last["seqkd"]["train/ce"] > 0
    assert len(list((tmp_path / ".kdexp-cache").glob("teacher-outputs-*.jsonl"))) >= 2  # seqkd, distillm2
    # ImitKD: the student's share grows as beta decays.
    shares = [r["method/student_fraction"] for r in records(runs["imitkd"])]
    assert shares[0] < shares[-1]
    # DistiLLM: its scheduler state is logged.
    assert {"method/phi", "method/buffer"} <= last["distillm"].keys()
    # SGO: generated before training, then regenerated `refresh` = 2 times.
    assert last["sgo"]["method/generations"] == 3
    # MiniLLM: policy gradient and the single-step reverse KL, from a refilled store.
    assert {"train/minillm_pg", "train/rkl"} <= last["minillm"].keys() and last["minillm"]["method/refills"] >= 1
    # DistiLLM-2: skew KL on teacher rows and skew reverse KL on student rows.
    assert last["distillm2"]["train/skl"] > 0 and last["distillm2"]["train/srkl"] > 0
    # TAID: t rises from t_start.
    ts = [r["method/taid_t"] for r in records(runs["taid"])]
    assert ts[0] >= 0.4 and ts[-1] > ts[0]
    # GKD + RL: a REINFORCE term next to the divergence, rewards in [0, 1].
    assert "train/reinforce" in last["gkd_rl"] and 0 <= last["gkd_rl"]["method/reward"] <= 1
    for method, run in runs.items():
        assert read_json(run / "results.json")["rougeL"] >= 0, method


def test_gkd_lmbda_one_is_fully_on_policy_and_zero_is_supervised(tmp_path):
    for lmbda, share in (("1", 1.0), ("0", 0.0)):
        run = tmp_path / f"l{lmbda}"
        kdexp("train", *QUICK, "train.eval_every=0", "method=gkd", f"method.lmbda={lmbda}",
              f"hydra.run.dir={run}", cwd=tmp_path)
        assert all(r["method/student_fraction"] == share for r in records(run))


def test_methods_start_from_a_local_hugging_face_directory(tmp_path):
    """The papers' protocol: fine-tune first, then distil from the fine-tuned directory."""
    kdexp("train", *QUICK, "train.eval_every=0", "method=sft", "teacher=none", f"hydra.run.dir={tmp_path / 'sft'}",
          cwd=tmp_path)
    final = tmp_path / "sft" / "final"
    assert (final / "config.json").is_file()
    kdexp("train", "-m", *QUICK, "train.eval_every=0", f"method={','.join(NEW)}", f"student.name_or_path={final}",
          "train.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=900)
    runs = {OmegaConf.load(p.parent / "config.yaml").method.name: OmegaConf.load(p.parent / "config.yaml")
            for p in (tmp_path / "sweep").glob("*/results.json")}
    assert set(runs) == set(NEW)
    assert all(cfg.student.name_or_path == str(final) for cfg in runs.values())
    # The folder's weights are loaded, not a fresh init: with a vanishing lr the scores are the SFT run's.
    kdexp("train", *QUICK, "train.eval_every=0", f"student.name_or_path={final}", "train.lr=1e-30", "train.max_steps=1",
          f"hydra.run.dir={tmp_path / 'frozen'}", cwd=tmp_path)
    frozen, sft = (read_json(tmp_path / run / "results.json") for run in ("frozen", "sft"))
    assert frozen["student"]["per_seed"] == sft["student"]["per_seed"]


@pytest.mark.parametrize(("args", "message"), [
    (["method=gkd", "method.lmbda=1.5"], "method.lmbda must be in [0, 1], got 1.5"),
    (["method=taid", "loss=fkl"], "method=taid schedules the t of loss=taid"),
    (["method=distillm", "method.replay_ratio=sometimes"], "method.replay_ratio must be one of"),
    (["method=gkd_rl", "method.reward=bleu"], "method.reward must be one of"),
    (["method=minillm", "method.pt_data=missing.jsonl"], "is not a file"),
])
def test_bad_method_parameters_are_one_line_errors(tmp_path, args, message):
    out = kdexp("train", *QUICK, *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()  # refused before anything is written
