"""``kdexp analyze NAME`` end to end: a trained run and the teacher itself on one plot."""

from __future__ import annotations

import pytest

from kdexp.analyze import NO_TEACHER
from kdexp.cli import ANALYSES
from tests.conftest import FAST, kdexp, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

SMALL = ["analyze.max_samples=6", "analyze.n_samples=2", "analyze.max_new_tokens=16", "analyze.batch_size=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    kdexp("train", *FAST, "eval.teacher=false", f"hydra.run.dir={root / 'run'}", cwd=root)
    return root / "run"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x


@pytest.mark.parametrize("name", [a for a in ANALYSES if a not in NO_TEACHER])
def test_every_analysis_compares_a_run_with_the_teacher_itself(run, tmp_path, name):
    """``tiny`` is the teacher preset: analyzed against itself it must show no difference."""
    out = tmp_path / "out"
    proc = kdexp("analyze", name, str(run), "tiny", "analyze.labels=[kd,same]", "logger=none", *SMALL,
                 f"hydra.run.dir={out}", cwd=tmp_path)
    assert f"kdexp analyze {name}" in proc.stdout and "| kd |" in proc.stdout
    record = read_json(out / f"{name}.json")
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / f"{name}.md").read_text().count("| same |") == 1
    assert record["analysis"] == name and record["prompts"] == 6 and record["data"] == "toy"
    assert record["models"] == ["kd", "same"]
    kd, same = record["summary"]["kd"], record["summary"]["same"]
    if name == "exposure":
        for d in ("sample", "greedy"):
            assert same[f"{d}_eps"] == 0.0 and same[f"{d}_ExAccErr"] is None  # 0 / 0
            assert kd[f"{d}_eps"] > 0 and finite(kd[f"{d}_ExAccErr"]) and kd[f"{d}_l"] >= 1
        r = record["results"]["kd"]["sample"]
        assert r["n_samples"] == 2 and len(r["ExAccErr_se"]) == len(r["l"])
        assert record["results"]["kd"]["greedy"]["n_samples"] == 1
    elif name == "difficulty":
        assert same["kl"] == pytest.approx(0, abs=1e-5) and same["top1_agreement"] == 100.0
        assert kd["kl"] > 0.1 and sum(record["results"]["kd"]["count"]) == kd["tokens"]
    elif name == "calibration":
        assert list(record["summary"]) == ["teacher", "kd", "same"]
        assert same == record["summary"]["teacher"] and 0 <= kd["ece"] <= 100
    elif name == "diversity":
        assert same == record["summary"]["teacher"]  # the same model, the same seeds
        assert all(0 <= kd[f"distinct_{n}"] <= 1 for n in range(1, 5)) and 0 <= kd["self_bleu"] <= 100
    elif name == "speculative":
        assert same["alpha"] == pytest.approx(1, abs=1e-5) and same["empirical"] == 1.0
        assert 0 <= kd["alpha"] < 0.9 and same["tokens_per_call_g4"] == pytest.approx(5, abs=1e-4)
    elif name == "curves":
        assert same["kl_teacher_forced"] == pytest.approx(0, abs=1e-5)
        assert same["kl_free_running"] == pytest.approx(0, abs=1e-5) and kd["kl_free_running"] > 0.1


def test_a_model_directory_with_wandb_panels(run, tmp_path):
    """Any Hugging Face directory works; W&B (offline here) gets the figure and the tables."""
    out = tmp_path / "out"
    kdexp("analyze", "calibration", str(run / "final"), "logger=wandb", *SMALL, f"hydra.run.dir={out}",
          cwd=tmp_path)
    record = read_json(out / "calibration.json")
    assert record["models"] == [str(run / "final")]
    media = list((out / "wandb").glob("offline-run-*/files/media"))
    assert media, "no W&B media written"
    assert list(media[0].glob("images/analyze/calibration_*.png"))
    assert list(media[0].glob("table/analyze/calibration/table_*.table.json"))
    assert list(media[0].glob("table/analyze/calibration/curves_*.table.json"))


@pytest.mark.parametrize("args, message", [
    (["exposre"], "unknown analysis 'exposre'; did you mean 'exposure'?"),
    ([], "which analysis?"),
    (["exposure"], "which model?"),
    (["exposure", "tiny", "analyze.labels=[a,b]"], "analyze.labels has 2 names for 1 models"),
    (["diversity", "tiny", "analyze.n_samples=1"], "set analyze.n_samples >= 2"),
    (["exposure", "tiny", "analyze.decoding=[beam]"], "unknown analyze.decoding entry 'beam'"),
    (["speculative", "tiny", "analyze.n_bucket=3"], "did you mean 'analyze.n_buckets'?"),
    (["routing", "tiny"], "kdexp analyze routing reads a mixture-of-experts model's router, and LlamaForCausalLM"),
])
def test_bad_analyze_commands_are_one_line_errors(tmp_path, args, message):
    proc = kdexp("analyze", *args, "logger=none", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
