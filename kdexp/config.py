"""Where the Hydra configs live, the ``${kdexp.asset:NAME}`` resolver, and checks of a
composed config made before any model or dataset is loaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdexp.params import Param, between, nonneg, nonneg_int, one_of, optional, positive, positive_int, unit

GROUPS = ("method", "loss", "student", "teacher", "data", "eval", "logger")


def conf_dir() -> Path:
    """``conf/`` of a source checkout, or ``kdexp/conf`` of an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"kdexp's conf/ directory is missing (looked next to {here})")


def register_resolvers() -> None:
    """``${kdexp.asset:tiny-teacher}`` -> the bundled model directory (idempotent)."""
    from kdexp.assets import asset_path

    if not OmegaConf.has_resolver("kdexp.asset"):
        OmegaConf.register_new_resolver("kdexp.asset", asset_path)


def compose(overrides: list[str], name: str = "config") -> DictConfig:
    """``conf/NAME.yaml`` composed with ``overrides`` by Hydra's compose API (inside a running
    Hydra job, or on its own): ``compose(["data=dolly"]).data`` is the data section with that
    preset, ``compose([], "teacher/gpt2").teacher`` the keys the preset itself sets, as Hydra
    reads them (defaults lists, packages and interpolations included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(name, overrides=overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="kdexp"):
        return hydra_compose(name, overrides=overrides)


def group_choices(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    folder = conf_dir() / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def group_files() -> list[Path]:
    """Every option file under ``conf/`` (not ``config.yaml``), through symbolic links:
    ``conf/sweep`` is a link to the top-level ``sweeps/``."""
    root = conf_dir()
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        if Path(folder) != root:
            found += [Path(folder) / f for f in files if f.endswith(".yaml")]
    return sorted(found)


def all_groups() -> list[str]:
    """Every config group under ``conf/`` (nested ones as ``a/b``), the user-facing ones first."""
    root = conf_dir()
    found = sorted(str(p.relative_to(root).parent) for p in group_files())
    groups = list(dict.fromkeys(found))
    return [g for g in GROUPS if g in groups] + [g for g in groups if g not in GROUPS]


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (``train.max_steps``, ...)."""
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            path = f"{prefix}{k}"
            keys.append(path)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                keys.extend(flat_keys(node, path + "."))
    return keys


def writable_dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be created and written to, or ``None`` when it can."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"the output directory {path} cannot be created: {probe} is not a directory"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".kdexp-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return f"the output directory {path} is not writable ({err.strerror}); set hydra.run.dir=DIR"
    return None


def teachers_rule(cfg: DictConfig) -> str | None:
    """``teachers.rule`` when the run combines several teachers, else None (one teacher)."""
    return (cfg.get("teachers") or {}).get("rule") or None


def is_url(name: Any) -> bool:
    """Whether a teacher's name is a server's address (``teacher.url``; ``teachers.names`` entries may be)."""
    return str(name).startswith(("http://", "https://"))


def is_cached(name: Any) -> bool:
    """Whether a ``teachers.names`` entry is a teacher's top-k cache (``cache:NAME``)."""
    return str(name).startswith("cache:")


# The kinds of teacher.source (kdexp.teachers.SOURCES registers one builder for each).
TEACHER_SOURCES = ("live", "cache", "server")

# The run's own settings, checked by :func:`problems` (the method's and the divergence's
# parameters are declared in their records: kdexp.methods.METHODS, kdexp.losses.catalog).
SETTINGS: tuple[Param, ...] = (
    Param("seed", nonneg_int, "an integer >= 0"),
    Param("train.max_steps", positive_int, "an integer > 0"),
    Param("train.epochs", optional(positive), "> 0 or null"),
    Param("train.warmup_ratio", optional(between(0, 1, high_open=True)), "in [0, 1) or null"),
    Param("train.batch_size", positive_int, "an integer > 0"),
    Param("train.micro_batch_size", positive_int, "an integer > 0"),
    Param("train.lr", positive, "> 0"),
    Param("train.weight_decay", nonneg, ">= 0"),
    Param("train.warmup_steps", nonneg_int, "an integer >= 0"),
    Param("train.min_lr_ratio", unit, "in [0, 1]"),
    Param("train.lr_schedule", one_of("linear", "cosine", "constant"), "linear, cosine or constant"),
    Param("train.max_grad_norm", nonneg, ">= 0 (0 turns clipping off)"),
    Param("train.eval_every", nonneg_int, "an integer >= 0 (0: never)"),
    Param("train.eval_samples", positive_int, "an integer > 0"),
    Param("train.save_every", nonneg_int, "an integer >= 0 (0: only at the end)"),
    Param("train.keep_checkpoints", positive_int, "an integer > 0"),
    Param("train.max_bad_steps", positive_int, "an integer > 0"),
    Param("train.router_aux_weight", lambda v: v == "auto" or nonneg(v), "auto or a number >= 0 (0: off)"),
    Param("data.on_error", one_of("fail", "skip"), "fail or skip"),
    Param("train.log_every", positive_int, "an integer > 0"),
    Param("teacher.source", one_of(*TEACHER_SOURCES), " or ".join(TEACHER_SOURCES)),
    Param("teacher.top_k", positive_int, "an integer > 0"),
    Param("teacher.sparse", one_of("topk", "sampled"), "topk or sampled"),
    Param("teacher.samples", lambda v: positive_int(v) and v <= 255, "an integer from 1 to 255"),
    Param("teacher.sample_seed", nonneg_int, "an integer >= 0"),
    Param("teachers.rule", one_of(None, "route", "mixture", "relative", "mot"), "route, mixture, relative, mot or null"),
    Param("teachers.branch_steps", positive_int, "an integer > 0 (optimizer steps per branch of teachers.rule=mot)"),
    Param("teachers.weights", lambda v: v is None or (len(v) > 0 and all(nonneg(w) for w in v) and sum(v) > 0),
          "null or a list of weights >= 0 with a positive sum"),
    Param("teachers.alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    Param("teachers.route_map", lambda v: v is None or hasattr(v, "items"), "null or a mapping {field value: teacher}"),
    Param("teacher.timeout", positive, "> 0 (seconds)"),
    Param("teacher.retries", nonneg_int, "an integer >= 0"),
    Param("teacher.concurrency", positive_int, "an integer > 0"),
    Param("serve.port", lambda v: nonneg_int(v) and v < 65536, "a port number in [0, 65535] (0: any free port)"),
    Param("serve.max_batch_tokens", positive_int, "an integer > 0"),
    Param("serve.max_logprobs", positive_int, "an integer > 0"),
    Param("data.max_prompt_length", positive_int, "an integer > 0"),
    Param("data.max_length", positive_int, "an integer > 0"),
    Param("eval.data.max_prompt_length", optional(positive_int), "an integer > 0 or null"),
    Param("eval.data.max_length", optional(positive_int), "an integer > 0 or null"),
    Param("eval.data.too_long", one_of(None, "truncate", "cut_end", "skip", "error"),
          "truncate, cut_end, skip, error or null"),
    Param("eval.temperature", positive, "> 0"),
    Param("eval.top_p", unit, "in (0, 1]"),
    Param("eval.top_k", nonneg_int, "an integer >= 0 (0: off)"),
    Param("eval.max_new_tokens", positive_int, "an integer > 0"),
    Param("eval.no_repeat_ngram_size", nonneg_int, "an integer >= 0 (0: off)"),
    Param("eval.batch_size", positive_int, "an integer > 0"),
    Param("rollout.temperature", positive, "> 0"),
    Param("rollout.top_p", between(0, 1, low_open=True), "in (0, 1]"),
    Param("rollout.top_k", nonneg_int, "an integer >= 0 (0: off)"),
    Param("rollout.max_new_tokens", positive_int, "an integer > 0"),
    Param("rollout.batch_size", positive_int, "an integer > 0"),
    Param("analyze.max_samples", optional(positive_int), "an integer > 0 or null (all)"),
    Param("analyze.n_samples", positive_int, "an integer > 0"),
    Param("analyze.temperature", positive, "> 0"),
    Param("analyze.top_p", between(0, 1, low_open=True), "in (0, 1]"),
    Param("analyze.top_k", nonneg_int, "an integer >= 0 (0: off)"),
    Param("analyze.max_new_tokens", positive_int, "an integer > 0"),
    Param("analyze.max_steps", optional(positive_int), "an integer > 0 or null"),
    Param("analyze.min_count", positive_int, "an integer > 0"),
    Param("analyze.length", optional(positive_int), "an integer > 0 or null"),
    Param("analyze.n_buckets", positive_int, "an integer > 0"),
    Param("analyze.n_bins", positive_int, "an integer > 0"),
    Param("analyze.gammas", lambda v: len(v) > 0 and all(positive_int(g) for g in v), "a non-empty list of integers > 0"),
    Param("analyze.batch_size", positive_int, "an integer > 0"),
    Param("osd.max_queries", optional(positive_int), "an integer > 0 or null (all)"),
    Param("osd.gamma", nonneg_int, "an integer >= 0 (0: the target alone)"),
    Param("osd.temperature", nonneg, ">= 0 (0: greedy)"),
    Param("osd.max_new_tokens", positive_int, "an integer > 0"),
    Param("osd.window", positive_int, "an integer > 0"),
    Param("osd.update_every", positive_int, "an integer > 0"),
    Param("osd.buffer_size", positive_int, "an integer > 0"),
    Param("osd.steps_per_update", positive_int, "an integer > 0"),
    Param("osd.lr", positive, "> 0"),
    Param("osd.cost_ratio", optional(nonneg), ">= 0 or null (the parameter counts' ratio)"),
    Param("osd.seed", nonneg_int, "an integer >= 0"),
    Param("rollout.stop_ids", lambda v: all(nonneg_int(i) for i in v), "a list of token ids"),
)


def problems(cfg: DictConfig, keys: Iterable[str] | None = None) -> list[str]:
    """Every problem of a composed config, one line each (empty when it is fine)."""
    out = []
    wanted = set(keys) if keys is not None else None
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if wanted is None or any(key == k or key.startswith(k + ".") for k in wanted):
            out.append(f"{key} is required: set {key}=...")
    for p in SETTINGS:
        if wanted is not None and not any(p.name == k or p.name.startswith(k + ".") for k in wanted):
            continue
        value = OmegaConf.select(cfg, p.name, default="<absent>")
        if value != "<absent>" and (problem := p.problem(value)):
            out.append(problem)
    data = cfg.get("data")
    if data is not None and positive_int(data.get("max_prompt_length")) and positive_int(data.get("max_length")):
        if data.max_prompt_length >= data.max_length:
            out.append(f"data.max_prompt_length ({data.max_prompt_length}) must be smaller than "
                       f"data.max_length ({data.max_length})")
    if cfg.get("eval") is not None and not cfg.eval.get("seeds"):
        out.append("eval.seeds must list at least one seed")
    return out
