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
    from kdexp.models import asset_path

    if not OmegaConf.has_resolver("kdexp.asset"):
        OmegaConf.register_new_resolver("kdexp.asset", asset_path)


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


def _in(lo: float, hi: float) -> Any:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_CHECKS: list[tuple[str, Any, str]] = [
    ("seed", _nonneg_int, "an integer >= 0"),
    ("train.max_steps", _positive_int, "an integer > 0"),
    ("train.epochs", lambda v: v is None or _positive(v), "> 0 or null"),
    ("train.warmup_ratio", lambda v: v is None or _in(0, 1)(v) and v < 1, "in [0, 1) or null"),
    ("train.batch_size", _positive_int, "an integer > 0"),
    ("train.micro_batch_size", _positive_int, "an integer > 0"),
    ("train.lr", _positive, "> 0"),
    ("train.weight_decay", _in(0, float("inf")), ">= 0"),
    ("train.warmup_steps", _nonneg_int, "an integer >= 0"),
    ("train.min_lr_ratio", _in(0, 1), "in [0, 1]"),
    ("train.lr_schedule", lambda v: v in ("linear", "cosine", "constant"), "linear, cosine or constant"),
    ("train.max_grad_norm", _in(0, float("inf")), ">= 0 (0 turns clipping off)"),
    ("train.eval_every", _nonneg_int, "an integer >= 0 (0: never)"),
    ("train.eval_samples", _positive_int, "an integer > 0"),
    ("train.save_every", _nonneg_int, "an integer >= 0 (0: only at the end)"),
    ("train.keep_checkpoints", _positive_int, "an integer > 0"),
    ("train.max_bad_steps", _positive_int, "an integer > 0"),
    ("data.on_error", lambda v: v in ("fail", "skip"), "fail or skip"),
    ("train.log_every", _positive_int, "an integer > 0"),
    ("method.kd_weight", lambda v: v == "adaptive" or _in(0, 1)(v), "in [0, 1] or 'adaptive'"),
    ("method.sample_weight", lambda v: v in ("none", "teacher_likelihood", "student_likelihood"),
     "one of none, teacher_likelihood, student_likelihood"),
    ("method.min_weight", lambda v: _in(0, 1)(v) and v > 0, "in (0, 1]"),
    ("loss.temperature", _positive, "> 0"),
    ("teacher.source", lambda v: v in ("live", "cache"), "live or cache"),
    ("teacher.top_k", _positive_int, "an integer > 0"),
    ("data.max_prompt_length", _positive_int, "an integer > 0"),
    ("data.max_length", _positive_int, "an integer > 0"),
    ("eval.data.max_prompt_length", lambda v: v is None or _positive_int(v), "an integer > 0 or null"),
    ("eval.data.max_length", lambda v: v is None or _positive_int(v), "an integer > 0 or null"),
    ("eval.data.too_long", lambda v: v in (None, "truncate", "cut_end", "skip", "error"),
     "truncate, cut_end, skip, error or null"),
    ("eval.temperature", _positive, "> 0"),
    ("eval.top_p", _in(0, 1), "in (0, 1]"),
    ("eval.top_k", _nonneg_int, "an integer >= 0 (0: off)"),
    ("eval.max_new_tokens", _positive_int, "an integer > 0"),
    ("eval.no_repeat_ngram_size", _nonneg_int, "an integer >= 0 (0: off)"),
    ("eval.batch_size", _positive_int, "an integer > 0"),
    ("rollout.temperature", _positive, "> 0"),
    ("rollout.top_p", lambda v: _in(0, 1)(v) and v > 0, "in (0, 1]"),
    ("rollout.top_k", _nonneg_int, "an integer >= 0 (0: off)"),
    ("rollout.max_new_tokens", _positive_int, "an integer > 0"),
    ("rollout.batch_size", _positive_int, "an integer > 0"),
    ("analyze.max_samples", lambda v: v is None or _positive_int(v), "an integer > 0 or null (all)"),
    ("analyze.n_samples", _positive_int, "an integer > 0"),
    ("analyze.temperature", _positive, "> 0"),
    ("analyze.top_p", lambda v: _in(0, 1)(v) and v > 0, "in (0, 1]"),
    ("analyze.top_k", _nonneg_int, "an integer >= 0 (0: off)"),
    ("analyze.max_new_tokens", _positive_int, "an integer > 0"),
    ("analyze.max_steps", lambda v: v is None or _positive_int(v), "an integer > 0 or null"),
    ("analyze.min_count", _positive_int, "an integer > 0"),
    ("analyze.length", lambda v: v is None or _positive_int(v), "an integer > 0 or null"),
    ("analyze.n_buckets", _positive_int, "an integer > 0"),
    ("analyze.n_bins", _positive_int, "an integer > 0"),
    ("analyze.gammas", lambda v: len(v) > 0 and all(_positive_int(g) for g in v), "a non-empty list of integers > 0"),
    ("analyze.batch_size", _positive_int, "an integer > 0"),
    ("rollout.stop_ids", lambda v: all(_nonneg_int(i) for i in v), "a list of token ids"),
]


def problems(cfg: DictConfig, keys: Iterable[str] | None = None) -> list[str]:
    """Every problem of a composed config, one line each (empty when it is fine)."""
    out = []
    wanted = set(keys) if keys is not None else None
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if wanted is None or any(key == k or key.startswith(k + ".") for k in wanted):
            out.append(f"{key} is required: set {key}=...")
    for key, ok, what in _CHECKS:
        if wanted is not None and not any(key == k or key.startswith(k + ".") for k in wanted):
            continue
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>" or value is None and key.startswith("method."):
            continue
        if not ok(value):
            out.append(f"{key} must be {what}, got {value!r}")
    data = cfg.get("data")
    if data is not None and _positive_int(data.get("max_prompt_length")) and _positive_int(data.get("max_length")):
        if data.max_prompt_length >= data.max_length:
            out.append(f"data.max_prompt_length ({data.max_prompt_length}) must be smaller than "
                       f"data.max_length ({data.max_length})")
    if cfg.get("eval") is not None and not cfg.eval.get("seeds"):
        out.append("eval.seeds must list at least one seed")
    return out
