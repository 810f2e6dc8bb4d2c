"""Distillation across tokenizers through the CLI (loss.cross_tokenizer=uld|span)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, kdexp, read_json
from tests.smoke.test_distributed import steps

pytestmark = pytest.mark.usefixtures("teacher_available")

ARGS = [*FAST, "train.log_every=1", "train.save_every=0", "eval.seeds=[10]", "eval.max_samples=8"]


def test_with_one_tokenizer_span_is_the_ordinary_divergence(tmp_path):
    """Identical tokenizers: every span is one token on both sides and every token is matched,
    so loss.cross_tokenizer=span trains exactly as the plain kd path does."""
    for name, extra in (("plain", []), ("span", ["loss.cross_tokenizer=span"])):
        kdexp("train", *ARGS, "loss.fused=false", "loss=jsd", "loss.beta=0.3", *extra,
              f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    a, b = steps(tmp_path / "plain"), steps(tmp_path / "span")
    assert [r["train/loss"] for r in b] == pytest.approx([r["train/loss"] for r in a], rel=1e-5)
    wa, wb = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("plain", "span"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)


# span on kd's dataset text is the identical-tokenizer test's path; here span takes gkd's samples
@pytest.mark.parametrize("extra", [["loss.cross_tokenizer=uld"],
                                   ["loss.cross_tokenizer=span", "method=gkd", "rollout.max_new_tokens=12"]],
                         ids=["uld", "gkd-span"])
def test_the_other_tokenizer_teacher_trains_the_student(tmp_path, extra):
    """teacher=tiny-other (another vocabulary and merges): the run trains (the term is logged,
    finite), and the teacher is evaluated in its own tokens."""
    run = tmp_path / "run"
    kdexp("train", *ARGS, "teacher=tiny-other", "eval.teacher=true", *extra, f"hydra.run.dir={run}", cwd=tmp_path)
    term = "train/jsd_span" if "loss.cross_tokenizer=span" in extra else "train/uld"  # gkd's loss is jsd
    values = [r[term] for r in steps_with(run, term)]
    assert len(values) == 6 and all(v == v and v >= 0 for v in values)
    results = read_json(run / "results.json")
    assert results["teacher"]["rougeL"] > 50  # answered in its own tokens
    log = (run / "train.log").read_text()
    assert "teacher with another tokenizer" in log and "loss: plain path" in log


def steps_with(run, key: str) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]
