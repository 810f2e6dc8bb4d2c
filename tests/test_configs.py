"""Every YAML under conf/ and sweeps/ composes; presets say what they claim, nothing is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdexp import config, losses, methods, models
from kdexp.checks import declared_problems
from kdexp.data.templates import TEMPLATES

CONF = config.conf_dir()
GROUP_FILES = config.group_files()


def test_the_conf_tree_is_not_empty():
    assert (CONF / "config.yaml").is_file()
    assert len(GROUP_FILES) > 40


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_group_option_composes(path, compose):
    group = str(path.parent.relative_to(CONF))
    cfg = compose([f"{'+' if group == 'sweep' else ''}{group}={path.stem}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    # a value the user must give (an experiment's local corpus) is named in the preset's example
    header = path.read_text().split("\n\n")[0]
    given = {k for k in OmegaConf.missing_keys(cfg) if f"{k}=" in header}
    assert OmegaConf.missing_keys(cfg) == given, f"{path}: missing values {OmegaConf.missing_keys(cfg) - given}"
    assert [p for p in config.problems(cfg) if p.split(" ")[0] not in given] == []
    # Every preset opens with a runnable example of itself.
    first = next(line for line in path.read_text().splitlines() if not line.startswith("# @package"))
    assert first.startswith("# kdexp ") and f"{group}={path.stem}" in path.read_text(), path


def test_the_default_is_kd_of_the_tiny_teacher_on_toy(compose):
    cfg = compose()
    choices = {g: compose(hydra=True).hydra.runtime.choices[g] for g in config.GROUPS}
    assert choices == {"method": "kd", "loss": "fkl", "student": "tiny", "teacher": "tiny",
                       "data": "toy", "eval": "default", "logger": "wandb"}
    assert Path(cfg.teacher.name_or_path).is_dir() and Path(cfg.student.name_or_path).is_dir()
    assert cfg.student.init == "auto" and models.resolve_init(cfg.student) == "random"


def test_names_in_yaml_are_registry_names(compose):
    for loss in config.group_choices("loss"):
        assert compose([f"loss={loss}"]).loss.name == loss in losses.names()
    for method in config.group_choices("method"):
        assert compose([f"method={method}"]).method.name == method in methods.METHODS
    for data in config.group_choices("data"):
        cfg = compose([f"data={data}"])
        assert cfg.data.name == data and cfg.data.template in TEMPLATES


HUB = {"gpt2": "openai-community/gpt2", "gpt2-xl": "openai-community/gpt2-xl",
       "opt-6.7b": "facebook/opt-6.7b", "llama2-7b": "meta-llama/Llama-2-7b-hf",
       "llama-68m": "JackFram/llama-68m", "qwen2.5-7b": "Qwen/Qwen2.5-7B",
       "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"}


@pytest.mark.parametrize("group", ["student", "teacher"])
def test_hub_presets_name_hub_models(group, compose):
    wanted = {"tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "opt-125m", "opt-350m",
              "opt-1.3b", "opt-2.7b", "opt-6.7b", "tinyllama-1.1b", "llama2-7b", "llama2-13b",
              "llama-68m", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"}
    assert wanted <= set(config.group_choices(group))
    for name, hub_id in HUB.items():
        assert compose([f"{group}={name}"])[group].name_or_path == hub_id


def test_dolly_preset_follows_the_papers(compose):
    d = compose(["data=dolly"]).data
    assert (d.split.valid, d.split.test) == (500, 500)
    assert dict(d.fields)["input"] == "context" and dict(d.fields)["output"] == "response"
    assert (d.template, d.max_prompt_length, d.max_length) == ("alpaca", 256, 512)


def test_kd_is_hintons_recipe_by_default(compose):
    cfg = compose([])
    assert (cfg.method.kd_weight, cfg.loss.temperature, cfg.loss.t2_scale) == (0.5, 2.0, True)
    terms = methods.build_objective(cfg).terms
    assert [(t.name, t.weight) for t in terms] == [("ce", 0.5), ("fkl", 0.5 * 4.0)]
    # Any loss keeps the method's temperature unless told otherwise; sft has no KD term.
    assert compose(["loss=jsd"]).loss.temperature == 2.0
    assert compose(["loss=jsd", "loss.temperature=1"]).loss.temperature == 1.0


def test_kd_weight_is_the_ce_kd_shorthand(compose):
    spec = methods.objective_spec(compose(["method=kd", "loss=rkl", "method.kd_weight=0.3",
                                           "loss.temperature=2"]))
    assert spec == [{"loss": "ce", "weight": pytest.approx(0.7)},
                    {"loss": "rkl", "weight": 0.3, "temperature": 2.0, "t2_scale": True, "chunk_size": "auto",
                     "fused": "auto"}]
    assert methods.objective_spec(compose(["method=sft"])) == [{"loss": "ce", "weight": 1.0}]


def test_problems_reports_every_bad_value_at_once(compose):
    cfg = compose(["train.max_steps=0", "loss.temperature=-1", "data.max_prompt_length=600",
                   "eval.top_p=2"])
    found = declared_problems(cfg)
    assert len(found) == 4, found
    assert any("loss.temperature must be > 0" in p for p in found)
    assert any("train.max_steps" in p for p in found)
    assert any("max_prompt_length" in p and "max_length" in p for p in found)


@pytest.mark.parametrize("loss", losses.names())
def test_every_divergence_has_a_preset_with_its_parameters(loss, compose):
    cfg = compose([f"loss={loss}"])
    from kdexp.losses import catalog

    keys = set(cfg.loss) - {"name"} - {o.name for o in catalog.TERM_OPTIONS}  # options of the term, not the divergence
    params = losses.parameters(loss)
    assert keys == set(params), f"conf/loss/{loss}.yaml and kdexp.losses.parameters('{loss}') differ"
    for key in keys - {"chunk_size", "temperature"}:  # method=kd sets the temperature
        assert cfg.loss[key] == params[key], f"{loss}.{key}: yaml default differs from the code's"
    objective = methods.build_objective(cfg)
    assert [t.name for t in objective.terms] == ["ce", loss]


def test_adaptive_kd_weight_and_sample_weight(compose):
    cfg = compose(["method.kd_weight=adaptive", "loss=jsd", "loss.beta=0.9",
                   "method.sample_weight=teacher_likelihood", "method.min_weight=0.2"])
    objective = methods.build_objective(cfg)
    assert [(t.name, t.weight, t.adaptive) for t in objective.terms] == [("ce", 0.5, False), ("jsd", 0.5 * 4, True)]
    assert objective.sample_weight == "teacher_likelihood" and objective.min_weight == 0.2
    assert declared_problems(compose(["method.kd_weight=adaptiv"])) == [
        "method.kd_weight must be in [0, 1] or 'adaptive', got 'adaptiv' (method=kd)"]
    assert declared_problems(compose(["method.sample_weight=teacher"]))


@pytest.mark.parametrize("method", config.group_choices("method"))
def test_every_method_preset_builds_its_plan(method, compose):
    """Terms, source and hooks of every preset, without loading a model."""
    cfg = compose([f"method={method}"])
    plan = methods.build(cfg)
    assert plan.objective.terms
    assert plan.needs_teacher == (method != "sft")


def test_method_presets_choose_their_papers_loss(compose):
    chosen = {m: compose([f"method={m}"]).loss.name for m in ("gkd", "distillm", "minillm", "taid", "gkd_rl")}
    assert chosen == {"gkd": "jsd", "distillm": "skl", "minillm": "rkl", "taid": "taid", "gkd_rl": "jsd"}
    assert compose(["method=gkd", "loss=rkl"]).loss.name == "rkl"  # the command line still wins


def test_rollout_values_are_checked(compose):
    cfg = compose(["rollout.top_p=0", "rollout.temperature=-1", "rollout.stop_ids=[a]"])
    found = config.problems(cfg)
    assert "rollout.top_p must be in (0, 1], got 0" in found
    assert "rollout.temperature must be > 0, got -1" in found
    assert any(p.startswith("rollout.stop_ids must be a list of token ids") for p in found)
    assert config.problems(compose(["method=distillm2"])) == []


@pytest.mark.parametrize("name", config.group_choices("sweep"))
def test_every_sweep_names_itself_and_every_job_of_its_grid_composes(name, compose):
    """``kdexp train -m +sweep=NAME``: the W&B group and the tag are the sweep's name, the grid
    has the size its header claims, and every job's config is valid and builds its method."""
    import itertools
    import re

    cfg = compose([f"+sweep={name}"], hydra=True)
    assert cfg.logger.group == name and f"sweep-{name}" in cfg.tags
    assert OmegaConf.to_container(cfg.hydra.sweep)["dir"].startswith("multirun/${logger.group}/")
    params = cfg.hydra.sweeper.params
    grid = list(itertools.product(*[[f"{key}={v}" for v in str(values).split(",")]
                                    for key, values in params.items()]))
    header = (CONF / "sweep" / f"{name}.yaml").read_text().splitlines()[1]
    assert int(re.search(r"(\d+) jobs", header).group(1)) == len(grid) > 1
    for job in grid:
        job_cfg = compose([f"+sweep={name}", *job])
        assert config.problems(job_cfg) == [], job
        methods.build(job_cfg)  # the method accepts its loss and parameters


def test_every_divergence_is_declared_once_and_implemented_with_its_declared_parameters():
    """The records (kdexp/losses/catalog.py, no torch) and the implementations agree: the
    same names, each function's keyword parameters exactly the declared ones."""
    import inspect

    from kdexp.losses import catalog
    from kdexp.losses.divergences import DIVERGENCES, implements

    assert DIVERGENCES.names() == catalog.names() == losses.names()
    for name in catalog.names():
        sig = inspect.signature(DIVERGENCES.get(name))
        keywords = {p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert keywords == {"temperature"} | {p.name for p in catalog.DECLARED[name].params}, name
        assert all(p.doc for p in catalog.params(name).values()), name
    with pytest.raises(TypeError, match="differ from its record"):
        implements("jsd")(lambda s, t, *, temperature=1.0, gamma=0.5: s)


@pytest.mark.parametrize("loss", losses.names())
def test_a_divergences_preset_sets_exactly_its_declared_parameters(loss):
    from kdexp.losses import catalog

    preset = OmegaConf.to_container(OmegaConf.load(config.conf_dir() / "loss" / f"{loss}.yaml"))
    assert set(preset) - {"name"} == {p.name for p in catalog.DECLARED[loss].params}


@pytest.mark.parametrize("method", config.group_choices("method"))
def test_a_methods_preset_sets_only_declared_parameters_and_each_is_documented(method, compose):
    """One declaration per parameter: every key of the composed method section is declared in
    the method's record (or the common ones), with its range and one line of documentation."""
    record = methods.METHODS.get(method)
    declared = record.declared()
    cfg = compose([f"method={method}"])
    assert set(cfg.method) - {"name"} <= set(declared), set(cfg.method) - set(declared)
    assert {p.name for p in record.params} <= set(cfg.method), "a declared parameter without a default"
    assert all(p.doc and p.what for p in declared.values())
    assert declared_problems(cfg) == []


def test_the_declared_checks_import_no_torch():
    """What the command line runs before anything heavy: composing and checking a config."""
    import subprocess
    import sys

    code = ("import sys; from kdexp import cli; "
            "cli.main(['train', 'loss=fk1', 'method=gkd', 'method.lmbda=2'])")
    proc = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'fkl'" in proc.stderr and "method.lmbda must" in proc.stderr
    code = ("import sys; from kdexp import cli\ntry:\n    cli.main(['train', 'train.lr=-1'])\n"
            "except SystemExit:\n    print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]" and "train.lr must be > 0" in proc.stderr, proc.stdout + proc.stderr


def test_kdexp_eval_reads_a_preset_through_hydra_and_keeps_the_command_lines_model_settings(compose):
    """``kdexp eval model=PRESET``: the keys the preset sets (Hydra's compose of the preset),
    over the model settings given on the command line (student.*), which the preset leaves."""
    from kdexp.jobs import resolve_model

    cfg = compose(["model=gpt2", "student.trust_remote_code=true", "student.attn_implementation=eager",
                   "student.dtype=bfloat16", "student.revision=abc"])
    spec, label = resolve_model(cfg)
    assert label == "teacher=gpt2" and spec.name_or_path == "openai-community/gpt2"
    assert spec.dtype == "float32"  # the preset's own
    assert spec.trust_remote_code is True and spec.attn_implementation == "eager" and spec.revision == "abc"
    assert "source" not in spec and "top_k" not in spec  # a model spec: no teacher-only keys
