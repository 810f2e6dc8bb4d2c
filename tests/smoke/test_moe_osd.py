"""MoE students (the load-balancing term, ``kdexp analyze routing``) and ``kdexp osd`` end to end
on the bundled tiny models."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, kdexp, read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """An SFT and a KD run of the MoE student."""
    root = tmp_path_factory.mktemp("moe")
    for method in ("sft", "kd"):
        kdexp("train", f"method={method}", "student=tiny-moe", *FAST, f"hydra.run.dir={root / method}", cwd=root)
    return root


def test_an_moe_student_trains_with_its_load_balancing_term(moe_runs):
    logged = [json.loads(line) for line in (moe_runs / "kd" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "train/router_aux" in m]
    assert steps, "the load-balancing term is not logged"
    # top-2 of 4 experts: 2 when balanced, up to 4 when one pair takes every token
    assert all(2.0 - 1e-4 <= m["train/router_aux"] <= 4.0 for m in steps)
    # train/loss includes it at the config's weight (0.01): the terms alone are smaller
    m = steps[-1]
    terms = m["train/loss"] - 0.01 * m["train/router_aux"]
    assert terms > 0 and m["train/loss"] == pytest.approx(terms + 0.01 * m["train/router_aux"])
    assert read_json(moe_runs / "kd" / "results.json")["rougeL"] >= 0


def test_the_load_balancing_weight_can_be_set_and_is_refused_for_a_dense_student(tmp_path):
    kdexp("train", "method=sft", "student=tiny-moe", *FAST, "train.max_steps=2", "train.router_aux_weight=0",
          f"hydra.run.dir={tmp_path / 'off'}", cwd=tmp_path)
    assert "train/router_aux" not in (tmp_path / "off" / "metrics.jsonl").read_text()
    proc = kdexp("train", "method=sft", *FAST, "train.router_aux_weight=0.01", f"hydra.run.dir={tmp_path / 'dense'}",
                 cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "the student is not a mixture of experts" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "dense").exists()
    proc = kdexp("train", "method=sft", "student=tiny-moe", "method.sample_weight=teacher_likelihood", *FAST,
                 f"hydra.run.dir={tmp_path / 'weighted'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "set train.router_aux_weight=0" in proc.stderr
    assert not (tmp_path / "weighted").exists()


def test_routing_of_an_sft_and_a_kd_moe_student(moe_runs, tmp_path):
    out = tmp_path / "routing"
    proc = kdexp("analyze", "routing", str(moe_runs / "sft"), str(moe_runs / "kd"), "analyze.labels=[sft,kd]",
                 "logger=none", "analyze.max_samples=6", "analyze.n_samples=2", "analyze.max_new_tokens=16",
                 "analyze.min_count=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert "kdexp analyze routing" in proc.stdout and "| kd |" in proc.stdout
    record = read_json(out / "routing.json")
    assert record["teacher"] is None and (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    for label in ("sft", "kd"):
        r = record["results"][label]
        assert r["layers"] == 2 and r["experts"] == 4 and r["top_k"] == 2
        assert all(s["mean"][0] == 1.0 for s in r["per_step"])  # step 1: the same prompt
        assert all(0 <= a <= 1 for a in r["agreement"])
        for kind in ("teacher_forced", "free_running"):
            assert all(sum(layer) == pytest.approx(1) for layer in r["load"][kind])
            assert all(0 <= h <= 1.3863 for h in r["entropy"][kind])  # <= log 4
        assert 0 < record["summary"][label]["max_load_tf"] <= 4


def test_routing_of_models_with_their_own_tokenizers_and_routers(moe_runs, tmp_path):
    """A DeepSeek-V3 model with another tokenizer (ids up to 1531) before the Mixtral student
    (1024 embeddings): each model reads the prompts in its own tokens, and the DeepSeek
    routers' choices (bias-corrected, group-limited) are read, not recomputed from logits."""
    import shutil

    from kdexp.models import ASSETS
    from tests.unit.test_moe import deepseek

    other = tmp_path / "deepseek"
    deepseek(vocab=1532).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "tiny-teacher-other" / name, other / name)
    out = tmp_path / "routing"
    kdexp("analyze", "routing", str(other), str(moe_runs / "sft"), "analyze.labels=[deepseek,sft]", "logger=none",
          "analyze.max_samples=4", "analyze.n_samples=1", "analyze.max_new_tokens=8", f"hydra.run.dir={out}",
          cwd=tmp_path)
    results = read_json(out / "routing.json")["results"]
    d, m = results["deepseek"], results["sft"]
    assert (d["layers"], d["experts"], d["top_k"], d["chosen"], d["scoring"]) == (2, 8, 2, "router", "sigmoid")
    assert (m["layers"], m["experts"], m["top_k"], m["chosen"], m["scoring"]) == (2, 4, 2, "router", "softmax")
    for r in (d, m):
        assert all(s["mean"][0] == 1.0 for s in r["per_step"])  # step 1: the same prompt
        assert all(sum(layer) == pytest.approx(1) for layer in r["load"]["free_running"])
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"  # two shapes in one figure


def test_osd_serves_a_drifting_stream_static_and_online(tmp_path):
    out = tmp_path / "osd"
    proc = kdexp("osd", "logger=wandb", "osd.max_queries=12", "osd.window=4", "osd.update_every=2",
                 "osd.buffer_size=2", "osd.max_new_tokens=12", "osd.positions=all", "loss=jsd",
                 "osd.phases=[[fact,arith],[repeat]]", "data.toy.n_test=40", f"hydra.run.dir={out}", cwd=tmp_path)
    assert "| student static |" in proc.stdout and "| student online |" in proc.stdout
    record = read_json(out / "osd.json")
    assert (out / "osd.png").read_bytes()[:4] == b"\x89PNG" and (out / "osd.md").is_file()
    assert record["queries"] == 12 and record["phase_starts"] and record["loss"]["name"] == "jsd"
    static, online = record["results"]["student static"], record["results"]["student online"]
    assert static["updates"] == [] and [u[0] for u in online["updates"]] == [2, 4, 6, 8, 10, 12]
    assert all(u[1] >= 0 for u in online["updates"])
    assert len(static["windows"]["query"]) == 3 and static["windows"]["query"][-1] == 12
    for r in (static, online):
        assert sum(r["tokens"]) >= 12 and all(1 <= t <= 12 for t in r["tokens"])
        assert sum(r["accepted"]) <= sum(r["proposed"]) and r["summary"]["tokens_per_call"] >= 1
    # the same stream and random numbers: the first query (before any update) is served alike
    assert static["tokens"][0] == online["tokens"][0] and static["accepted"][0] == online["accepted"][0]
    media = list((out / "wandb").glob("offline-run-*/files/media/images/osd"))
    assert media and list(media[0].glob("figure_*.png"))


@pytest.mark.parametrize("args, message", [
    (["osd.order=drfit"], "unknown osd.order 'drfit'; did you mean 'drift'?"),
    (["osd.modes=[static,onlin]"], "unknown osd.modes entry 'onlin'"),
    (["osd.key=topic"], "by their 'topic' field"),
    (["osd.phases=[[fact],[repeet]]"], "did you mean 'repeat'?"),
    (["osd.gamma=-1"], "osd.gamma must be an integer >= 0"),
    (["loss=fkll"], "did you mean 'fkl'?"),
    (["osd.labels=[a,b]"], "osd.labels has 2 names for 1 drafts"),
])
def test_bad_osd_commands_are_one_line_errors(tmp_path, args, message):
    proc = kdexp("osd", *args, "logger=none", "osd.max_queries=2", f"hydra.run.dir={tmp_path / 'out'}",
                 cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
