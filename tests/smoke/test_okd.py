"""method=okd end to end: the teacher's base never changes, its module does and is saved as a
PEFT adapter that loads back onto the teacher; alpha=0 trains the module on references only."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from kdexp import methods
from kdexp.models import asset_path, load_model
from tests.conftest import FAST, kdexp

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

QUICK = [*FAST, "eval.max_samples=4", "eval.seeds=[10]", "train.log_every=1"]


def teacher():
    return load_model({"name_or_path": asset_path("tiny-teacher"), "init": "pretrained"}, "teacher")[0]


@pytest.mark.parametrize("module", ["lora", "prefix", "ptuning"])
def test_okd_trains_the_module_and_never_the_teacher(tmp_path, module):
    on_disk = load_file(str(asset_path("tiny-teacher") + "/model.safetensors"))
    run = tmp_path / "run"
    kdexp("train", *QUICK, "method=okd", f"method.module={module}", "method.num_virtual_tokens=4",
          f"hydra.run.dir={run}", cwd=tmp_path)
    after = load_file(str(asset_path("tiny-teacher") + "/model.safetensors"))
    assert all(torch.equal(on_disk[k], after[k]) for k in on_disk)  # the base teacher on disk
    adapter = load_file(str(run / "final_teacher_adapter" / "adapter_model.safetensors"))
    checkpoint = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert not any(k.startswith("teacher.") and "lora_" not in k and "prompt_encoder" not in k
                   for k in checkpoint)  # checkpoints hold the module, not the frozen teacher
    if module == "lora":  # B starts at zero; trained, it is not
        assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # The saved adapter loads back onto the untouched teacher and computes what the trained
    # module computes (the checkpoint's values on a fresh module; P-tuning saves its encoder's
    # output, not its weights, so compare logits).
    live = methods.okd_module(OmegaConf.load(run / "config.yaml")).attach(teacher())
    live.load_state_dict({k.removeprefix("teacher."): v for k, v in checkpoint.items()
                          if k.startswith("teacher.")}, strict=False)
    reloaded = PeftModel.from_pretrained(teacher(), str(run / "final_teacher_adapter"))
    ids = torch.tensor([[5, 9, 13, 21, 8]])
    with torch.no_grad():
        want, got = (m.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for m in (live, reloaded))
    torch.testing.assert_close(got, want)
    base = teacher()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(got[:, -ids.shape[1]:], base, atol=1e-6)  # the module changed the teacher
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]
    assert all({"train/fkl", "train/teacher_fkl", "train/teacher_ce", "train/teacher_grad_norm"} <= r.keys()
               for r in rows)


def test_okd_alpha_zero_trains_the_module_on_references_only(tmp_path):
    run = tmp_path / "run"
    kdexp("train", *QUICK, "method=okd", "method.alpha=0", f"hydra.run.dir={run}", cwd=tmp_path)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]
    assert all("train/teacher_fkl" not in r and "train/teacher_ce" in r for r in rows)


def test_okd_with_a_lora_student(tmp_path):
    run = tmp_path / "run"
    kdexp("train", *QUICK, "method=okd", "student.lora.enabled=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert (run / "final_adapter").is_dir() and (run / "final_teacher_adapter").is_dir()
    assert (run / "final" / "model.safetensors").is_file()
