"""The real CLI end to end on the bundled tiny models: train, records, eval, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import FAST, kdexp, logged, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]


# Training skips prompts over 24 tokens, evaluation cuts them (as eval=minillm does with
# MiniLLM's training data): the final evaluation must score eval.data's test set, all 12 prompts.
EVAL_DATA = ["data.max_prompt_length=24", "data.too_long=skip", "eval.data.too_long=cut_end"]


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    """One short KD run shared by the record checks below."""
    root = tmp_path_factory.mktemp("kd")
    proc = kdexp("train", *FAST, *EVAL_DATA, "eval.teacher=true", f"hydra.run.dir={root / 'run'}", cwd=root)
    return root / "run", proc


def test_train_prints_the_result_table(kd_run):
    run, proc = kd_run
    assert "| teacher |" in proc.stdout and "| student |" in proc.stdout
    assert "ROUGE-L" in proc.stdout and "exact match" in proc.stdout


def test_the_run_directory_is_the_record(kd_run):
    run, _ = kd_run
    for name in ("config.yaml", "metrics.jsonl", "results.json", "results.md", ".hydra/config.yaml",
                 "final/config.json", "final/model.safetensors", "final/tokenizer.json",
                 "generations/test_student.jsonl", "generations/test_teacher.jsonl"):
        assert (run / name).exists(), name
    results = read_json(run / "results.json")
    for key in ("rougeL", "exact_match", "rougeL_std", "exact_match_std"):
        assert 0.0 <= results[key] <= 100.0
    assert results["teacher"]["n"] == results["student"]["n"] == 12
    assert results["student"]["seeds"] == [10, 20] and results["train"]["steps"] == 6
    # Checkpoints at steps 3 and 6, written atomically: no temporary directory left behind.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000006"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all({"train/loss", "train/ce", "train/fkl", "train/lr"} <= set(r) for r in rows)
    # kd_weight 0.5 at T = 2 with T^2 scaling: the logged total is the weighted sum of the terms.
    for r in rows:
        assert r["train/loss"] == pytest.approx(0.5 * r["train/ce"] + 0.5 * 4 * r["train/fkl"], rel=1e-5)


def test_final_student_loads_with_plain_transformers(kd_run):
    run, _ = kd_run
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ckpt = load_file(str(run / "checkpoints" / "step_0000006" / "model.safetensors"))
    for name, param in model.state_dict().items():
        if name in ckpt:
            assert torch.equal(param, ckpt[name]), name
    assert tok.eos_token_id is not None and len(tok) == model.config.vocab_size


def test_eval_of_the_run_reproduces_its_final_numbers(kd_run, tmp_path):
    run, _ = kd_run
    proc = kdexp("eval", str(run), f"hydra.run.dir={tmp_path / 'eval'}", "logger=none", cwd=tmp_path)
    trained = read_json(run / "results.json")["student"]
    evaluated = read_json(tmp_path / "eval" / "results.json")
    for key in ("rougeL", "exact_match", "rougeL_std", "exact_match_std", "n", "seeds", "loss"):
        assert evaluated[key] == trained[key], key
    assert evaluated["n"] == 12  # eval.data's cut, not the training encoding's skip
    assert evaluated["loss"] > 0 and "### student of" in proc.stdout


def test_eval_on_several_sets_with_the_minillm_protocol(tmp_path):
    """eval.sets: the toy test split and two evaluation sets in MiniLLM's processed layout (one
    with a list of references); one table with the average over sets, a record per set."""
    data = tmp_path / "data"
    for folder, rows in {"self-inst": [{"prompt": f"Name<n>color {i}.", "output": ["Blue.", "Red."]}
                                       for i in range(3)],
                         "vicuna": [{"prompt": f"Question {i}?", "output": "Fine."} for i in range(2)]}.items():
        (data / folder).mkdir(parents=True)
        (data / folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    proc = kdexp("eval", "model=tiny", "eval=minillm", "eval.sets=[toy,self_inst,vicuna]",
                 f"eval.data_dir={data}", "eval.seeds=[10,20]", "eval.max_samples=4",
                 "eval.max_new_tokens=16", "data.toy.n_test=12", "logger=none", f"hydra.run.dir={out}",
                 cwd=tmp_path)
    results = read_json(out / "results.json")
    assert list(results["sets"]) == ["toy", "self_inst", "vicuna"]
    assert [results["sets"][s]["n"] for s in results["sets"]] == [4, 3, 2]
    for key in ("rougeL", "exact_match", "loss", "gen_length"):
        assert results[key] == pytest.approx(sum(r[key] for r in results["sets"].values()) / 3)
    assert results["eval"] == "minillm" and results["sets"]["toy"]["seeds"] == [10, 20]
    assert results["sets"]["toy"]["rougeL"] > 50  # the teacher knows its own task
    generated = [json.loads(x) for x in (out / "generations_self_inst.jsonl").read_text().splitlines()]
    assert generated[0]["references"] == ["Blue.", "Red."] and len(generated) == 3 * 2
    assert all(g["length"] <= 16 for g in generated)
    assert "| **average** |" in proc.stdout


def test_an_unknown_evaluation_set_is_a_one_line_error(tmp_path):
    proc = kdexp("eval", "model=tiny", "eval.sets=[self_isnt]", "logger=none",
                 f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "did you mean 'self_inst'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "e").exists()


def test_generate_writes_jsonl(kd_run, tmp_path):
    run, _ = kd_run
    out = tmp_path / "gen.jsonl"
    kdexp("generate", str(run), "generate.max_samples=3", f"generate.output={out}",
          f"hydra.run.dir={tmp_path / 'g'}", "logger=none", cwd=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) >= {"prompt", "output", "references"} for r in rows)


def test_generate_from_a_prompts_file(kd_run, tmp_path):
    run, _ = kd_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "### Instruction:\\nDescribe Alice.\\n\\n### Response:\\n"}\n'
                       '{"prompt": "### Instruction:\\nWhat is two plus two?\\n\\n### Response:\\n"}\n')
    out = tmp_path / "gen.jsonl"
    kdexp("generate", str(run), f"generate.prompts={prompts}", f"generate.output={out}",
          f"hydra.run.dir={tmp_path / 'g'}", "logger=none", cwd=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt here"}\n')
    bad = kdexp("generate", str(run), f"generate.prompts={tmp_path / 'bad.jsonl'}", "logger=none",
                cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "bad.jsonl:1" in bad.stderr and "Traceback" not in bad.stderr


# kd, gkd and okd are killed and resumed in tests/smoke/test_reliability.py (at a random step)
RESUMABLE = {
    "adaptive": ["method.kd_weight=adaptive", "method.sample_weight=student_likelihood"],
    "gkd": ["method=gkd", "rollout.max_new_tokens=16"],
    "distillm": ["method=distillm", "method.init_threshold=0.5", "method.capacity=8", "rollout.max_new_tokens=16"],
    "sgo": ["method=sgo", "method.refresh=1", "rollout.max_new_tokens=16"],
    "minillm": ["method=minillm", "method.num_rollouts=8", "method.ppo_epochs=2", "rollout.max_new_tokens=16"],
    "taid": ["method=taid"],
}


@pytest.mark.parametrize("objective", RESUMABLE.values(), ids=RESUMABLE.keys())
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, objective):
    """Killed after step 4 (checkpoint at 3), resumed: same weights and metrics as a clean run.

    The adaptive variant also needs the objective's running averages from the checkpoint; the
    methods on generated outputs need their sources' state (replay buffer, pregenerated
    outputs, rollout store, TAID's t) and decisions that depend on the step, not on history.
    """
    args = [*FAST, "train.max_steps=6", "train.save_every=3", "train.eval_every=2",
            "train.eval_samples=4", "eval.seeds=[10]", "eval.max_samples=4", "eval.max_new_tokens=12", *objective]
    kdexp("train", *args, f"hydra.run.dir={tmp_path / 'clean'}", cwd=tmp_path)
    killed = kdexp("train", *args, f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path,
                   env={"KDEXP_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_0000003"]
    kdexp("train", *args, "train.resume=true", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path)

    clean = load_file(str(tmp_path / "clean" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert clean.keys() == resumed.keys()
    for name in clean:
        assert torch.equal(clean[name], resumed[name]), name
    a, b = read_json(tmp_path / "clean" / "results.json"), read_json(tmp_path / "resumed" / "results.json")
    assert (a["rougeL"], a["exact_match"]) == (b["rougeL"], b["exact_match"])
    assert logged(tmp_path / "clean") == logged(tmp_path / "resumed")


def test_sft_runs_without_a_teacher(tmp_path):
    proc = kdexp("train", *FAST, "method=sft", "teacher=none", f"hydra.run.dir={tmp_path / 'r'}",
                 cwd=tmp_path)
    results = read_json(tmp_path / "r" / "results.json")
    assert "teacher" not in results and "| teacher |" not in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/fkl" not in r and r["train/loss"] == r["train/ce"] for r in rows)


def test_the_teachers_evaluation_is_shared_by_runs_that_ask_the_same(kd_run):
    """A second run with the same teacher, test set and eval settings reuses the first run's
    teacher scores and generations (a multirun evaluates its teacher once); other eval settings
    score it again."""
    run, _ = kd_run
    root = run.parent
    kept = list((root / ".kdexp-cache").glob("eval-*.json"))
    assert len(kept) == 1
    proc = kdexp("train", *FAST, *EVAL_DATA, "eval.teacher=true", "seed=7", f"hydra.run.dir={root / 'again'}",
                 cwd=root)
    assert "teacher: evaluation reused from" in proc.stdout + proc.stderr + (root / "again" / "train.log").read_text()
    assert read_json(root / "again" / "results.json")["teacher"] == read_json(run / "results.json")["teacher"]
    assert (root / "again" / "generations" / "test_teacher.jsonl").read_text() == \
        (run / "generations" / "test_teacher.jsonl").read_text()
    kdexp("train", *FAST, *EVAL_DATA, "eval.teacher=true", "eval.seeds=[10]", f"hydra.run.dir={root / 'other'}",
          cwd=root)
    assert len(list((root / ".kdexp-cache").glob("eval-*.json"))) == 2
