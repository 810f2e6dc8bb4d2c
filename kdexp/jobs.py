"""``kdexp eval`` and ``kdexp generate``: score or sample any model on a data split.

    kdexp eval runs/2026-11-22/10-00-00_train          # a run: its final student, its data and eval settings
    kdexp eval model=path/to/hf_model data=dolly data.path=dolly.jsonl
    kdexp eval model=tiny                               # a preset (teacher/ then student/), or a hub name
    kdexp eval model=RUN eval=minillm eval.sets=[dolly,self_inst,vicuna,sni,unni] eval.data_dir=data
    kdexp generate model=RUN_OR_MODEL generate.split=test generate.max_samples=8
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import logging
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp import config
from kdexp.data import encode, load_examples
from kdexp.data.sources import load_test_split
from kdexp.errors import UserError, unknown_choice
from kdexp.evaluation import evaluate_generation, teacher_forced_nll
from kdexp.evaluation.evaluate import mean_std
from kdexp.files import write_atomic
from kdexp.logging import make_logger
from kdexp.models import load_model
from kdexp.rollout import GenerationSpec, generate

log = logging.getLogger(__name__)


def _overridden(prefix: str) -> bool:
    """Whether the command line set ``prefix`` or anything under it (``data=...``, ``data.path=...``)."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # not under Hydra (tests calling the job directly)
        return True
    keys = [o.split("=", 1)[0].lstrip("+~") for o in task]
    return any(k == prefix or k.startswith(prefix + ".") for k in keys)


def resolve_model(cfg: DictConfig) -> tuple[DictConfig, str]:
    """The model spec to evaluate and a label for it; adopts a run's data / eval settings.

    ``model`` may be a run directory (its ``final/`` student), a Hugging Face model directory, a
    preset of ``teacher/`` or ``student/``, or a hub name. For a run directory, the run's
    ``data`` and ``eval`` settings are used unless the command line overrides them, so that
    ``kdexp eval RUN`` reproduces the run's own final evaluation.
    """
    target = cfg.get("model")
    if not target:
        raise UserError("which model? pass a run directory, a model directory, a preset or a hub "
                        "name: kdexp eval model=PATH")
    spec = OmegaConf.merge(cfg.student, {"name_or_path": None, "init": "pretrained",
                                         "lora": {"enabled": False}})
    path = Path(str(target)).expanduser()
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        run_cfg = OmegaConf.load(path / "config.yaml")
        with open_dict(cfg):
            for group in ("data", "eval"):
                if not _overridden(group):
                    cfg[group] = run_cfg[group]
        spec.name_or_path = str(path / "final")
        spec.dtype = run_cfg.student.dtype
        return spec, f"student of {path}"
    if path.is_dir():
        if (path / "config.yaml").is_file():
            raise UserError(f"{target} holds a run without its final student (final/): it has not finished; "
                            f"continue it with kdexp train train.resume=true hydra.run.dir={target}")
        if not (path / "config.json").is_file():
            raise UserError(f"{target} is neither a run directory (config.yaml and final/) nor a model directory "
                            f"(config.json): pass kdexp eval RUN_DIR, or a Hugging Face model directory")
        spec.name_or_path = str(path)
        return spec, str(path)
    for group in ("teacher", "student"):
        if str(target) in config.group_choices(group):
            own = config.compose([], f"{group}/{target}")[group]  # the keys the preset sets
            spec = OmegaConf.merge(spec, OmegaConf.masked_copy(own, [k for k in own if k in spec]))
            return spec, f"{group}={target}"
    spec.name_or_path = str(target)
    return spec, str(target)


def _examples(cfg: DictConfig, tokenizer, split: str, max_samples: int | None) -> list:
    examples = load_examples(cfg.data, tokenizer, [split])[split]
    return examples[:max_samples] if max_samples else examples


def eval_set(cfg: DictConfig, name: str | None) -> DictConfig:
    """The config (``data`` and ``eval`` resolved) for scoring one set of ``eval.sets``.

    ``None`` or the run's own data name: ``cfg.data``; another name: that ``data=`` preset on
    the schema's defaults. The keys of ``eval.data`` that are set (not null) apply to every
    set, and ``eval.*`` interpolations (``max_new_tokens: ${data.max_new_tokens}``) follow the
    set's data.
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if name is not None and name != cfg.data.name:
            if name not in config.group_choices("data"):
                raise unknown_choice("eval.sets entry", name, config.group_choices("data"))
            preset = config.compose([f"data={name}"]).data  # interpolations resolve in the run's config
            cfg.data = OmegaConf.create(OmegaConf.to_container(preset, resolve=False))
        own = OmegaConf.to_container(cfg.eval.get("data") or {}, resolve=True)
        cfg.data = OmegaConf.merge(cfg.data, {k: v for k, v in own.items() if v is not None})
    return OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                             "eval": OmegaConf.to_container(cfg.eval, resolve=True)})


def score_set(model, tokenizer, set_cfg: DictConfig, desc: str) -> tuple[dict[str, Any], list]:
    """Generation metrics over seeds, validation loss and length statistics on one set."""
    data_cfg = OmegaConf.to_container(set_cfg.data)
    records = load_test_split(data_cfg)
    if set_cfg.eval.max_samples:
        records = records[: set_cfg.eval.max_samples]
    examples = encode(records, tokenizer, data_cfg, "test")
    summary, generations = evaluate_generation(model, tokenizer, examples,
                                               OmegaConf.to_container(set_cfg.eval), desc=desc)
    summary["loss"] = teacher_forced_nll(model, examples, tokenizer.pad_token_id,
                                         set_cfg.eval.batch_size, per=set_cfg.eval.loss_mean)
    lengths = [g["length"] for g in generations]
    summary["gen_length_std"] = statistics.pstdev(lengths)
    summary["gen_length_max"] = max(lengths)
    summary["hit_max_new_tokens"] = 100.0 * statistics.fmean(
        n >= set_cfg.eval.max_new_tokens for n in lengths)
    return summary, generations


def eval_sets(cfg: DictConfig) -> dict[str, DictConfig]:
    """``{name: set config}`` of ``eval.sets``, or ``{data name: ...}`` of the config's own data
    (:func:`eval_set`): what :func:`evaluate` scores; composing them finds config errors."""
    return {name or cfg.data.name: eval_set(cfg, name) for name in list(cfg.eval.get("sets") or [None])}


def evaluate(cfg: DictConfig, models: dict[str, Any], tokenizer, sets: dict[str, DictConfig],
             write: Callable[[str, str, list], None],
             shared: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The one evaluation of kdexp: every model of ``models`` (label -> model) on every set of
    ``sets`` (:func:`eval_sets`), each scored by :func:`score_set`. Returns
    ``{label: {"sets": {set: row}, **average}}``: the average over the sets of :data:`SCALARS`,
    and the std over seeds of the per-seed averages of ROUGE-L and exact match. ``write(label,
    set, generations)`` keeps each set's generations. The end of ``kdexp train`` and
    ``kdexp eval`` both score through here.

    A value of ``models`` may be ``(model, tokenizer)``: that model is scored with its own
    tokenizer. ``shared``: for a label, what identifies that model beyond this run (a teacher as loaded:
    :func:`kdexp.models.model_identity`); its scores are then kept under ``rollout.cache_dir``
    and reused by every run that evaluates the same model on the same set with the same
    settings and code, e.g. every job of a multirun."""
    scored: dict[str, dict[str, Any]] = {}
    run_tokenizer = tokenizer
    for label, model in models.items():
        # a model with a tokenizer of its own (a teacher with another tokenizer): (model, tokenizer)
        model, tokenizer = model if isinstance(model, tuple) else (model, run_tokenizer)
        rows: dict[str, dict[str, Any]] = {}
        for name, set_cfg in sets.items():
            desc = label if len(sets) == 1 else f"{label} {name}"
            identity = (shared or {}).get(label)
            if identity is None:
                rows[name], generations = score_set(model, tokenizer, set_cfg, desc=desc)
            else:
                rows[name], generations = _shared_score(model, tokenizer, set_cfg, desc, identity, cfg)
            write(label, name, generations)
        average = {k: statistics.fmean(r[k] for r in rows.values()) for k in SCALARS}
        for k in ("rougeL", "exact_match"):  # the std over seeds of the per-seed averages
            per_seed = [statistics.fmean(r["per_seed"][i][k] for r in rows.values())
                        for i in range(len(cfg.eval.seeds))]
            average[f"{k}_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        scored[label] = {**average, "sets": rows}
    return scored


EVAL_MODULES = ("kdexp.jobs", "kdexp.evaluation.evaluate", "kdexp.evaluation.metrics", "kdexp.rollout",
                "kdexp.data.encode", "kdexp.data.sources")


@functools.cache
def _eval_code() -> str:
    """A hash of the code that scores a model: a change to it invalidates shared evaluations."""
    digest = hashlib.sha256()
    for name in EVAL_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


def _shared_score(model, tokenizer, set_cfg: DictConfig, desc: str, identity: Mapping[str, Any],
                  cfg: DictConfig) -> tuple[dict[str, Any], list]:
    """:func:`score_set`, kept in ``rollout.cache_dir/eval-KEY.json`` for the next run that
    asks the same (model identity, set and evaluation settings, device, precision, code)."""
    device = next(model.parameters()).device
    blob = json.dumps({"model": identity, "set": OmegaConf.to_container(set_cfg, resolve=True),
                       "device": device.type, "precision": str(cfg.train.get("mixed_precision")),
                       "torch": torch.__version__, "code": _eval_code()}, sort_keys=True, default=str)
    path = Path(str(cfg.rollout.cache_dir)) / f"eval-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
            log.info("%s: evaluation reused from %s (same model, set, settings and code)", desc, path)
            return kept["row"], kept["generations"]
        except (OSError, ValueError, KeyError):
            pass  # damaged: score again and replace it
    row, generations = score_set(model, tokenizer, set_cfg, desc=desc)
    write_atomic(path, json.dumps({"row": row, "generations": generations}))  # a concurrent job reads all or none
    return row, generations


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Evaluate one model on ``eval.sets`` (or the run's data): ROUGE-L / exact match over
    seeds, validation loss and generation lengths per set, and their average over sets."""
    spec, label = resolve_model(cfg)
    issues = config.problems(cfg, keys=["data", "eval"])
    if issues:
        raise UserError("; ".join(issues))
    sets = eval_sets(cfg)  # config errors before the model is loaded
    model, tokenizer = load_model(spec, "model")
    logger = make_logger(cfg, run_dir, job_type="eval")
    several = len(sets) > 1

    def write(_: str, name: str, generations: list) -> None:
        with (run_dir / f"generations{'_' + name if several else ''}.jsonl").open("w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generations)

    try:
        scored = evaluate(cfg, {"model": model}, tokenizer, sets, write)["model"]
        rows = scored.pop("sets")
        for name, row in rows.items():
            logger.log({f"eval/{name}/{k}": row[k] for k in SCALARS}, 0)
        results = {"model": label, "split": cfg.eval.split, "data": cfg.data.name,
                   "eval": cfg.eval.name, **scored, "sets": rows}
        if len(rows) == 1:
            results.update(next(iter(rows.values())))
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        table = sets_table(label, rows, cfg.eval.name)
        (run_dir / "results.md").write_text(table + "\n")
        logger.summary({f"eval/average/{k}": scored[k] for k in ("rougeL", "exact_match")})
    finally:
        logger.finish()
    print(f"\n{table}\n", flush=True)
    return results


SCALARS = ("rougeL", "exact_match", "loss", "gen_length")


def sets_table(label: str, rows: dict[str, dict[str, Any]], protocol: str) -> str:
    """A markdown table: one row per set (mean ± std over seeds), and the average over sets."""
    lines = [f"### {label}, eval={protocol}", "",
             "| set | n | ROUGE-L | exact match | loss | gen length (mean / max) | hit max_new_tokens | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        n = len(r["seeds"])
        lines.append(f"| {name} | {r['n']} | {mean_std(r['rougeL'], r['rougeL_std'], n)} "
                     f"| {mean_std(r['exact_match'], r['exact_match_std'], n)} | {r['loss']:.3f} "
                     f"| {r['gen_length']:.1f} / {r['gen_length_max']} | {r['hit_max_new_tokens']:.1f} % | {n} |")
    if len(rows) > 1:
        mean = {k: statistics.fmean(r[k] for r in rows.values()) for k in SCALARS}
        lines.append(f"| **average** | | {mean['rougeL']:.2f} | {mean['exact_match']:.2f} "
                     f"| {mean['loss']:.3f} | {mean['gen_length']:.1f} | | |")
    return "\n".join(lines)


def run_generate(cfg: DictConfig, run_dir: Path) -> Path:
    """Sample responses for a split (or a prompts file) and write them as JSONL."""
    spec, label = resolve_model(cfg)
    issues = config.problems(cfg, keys=["data", "eval"])
    if issues:
        raise UserError("; ".join(issues))
    model, tokenizer = load_model(spec, "model")
    g = cfg.generate
    if g.prompts:
        from kdexp.data.encode import Example
        from kdexp.data.sources import read_rows

        records = []
        for line, row in read_rows(g.prompts, cfg.data.get("on_error") or "fail"):
            if not str(row.get("prompt") or "").strip():
                raise UserError(f"{g.prompts}:{line}: no \"prompt\" (each line needs a non-empty "
                                f"\"prompt\" field)")
            records.append({"prompt": str(row["prompt"]), "output": "",
                            "references": [str(r) for r in row.get("references", [])]})
        ids = tokenizer([r["prompt"] for r in records], add_special_tokens=True)["input_ids"]
        examples = [Example(p, [], r) for p, r in zip(ids, records, strict=True)]
    else:
        examples = _examples(cfg, tokenizer, g.split, g.max_samples)
    texts, lengths = generate(model, tokenizer, examples, GenerationSpec.from_cfg(cfg.eval),
                              seed=int(g.seed), batch_size=int(cfg.eval.batch_size))
    out = Path(g.output) if g.output else run_dir / "generations.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for ex, text, n in zip(examples, texts, lengths, strict=True):
            f.write(json.dumps({"prompt": ex.record["prompt"], "output": text, "length": n,
                                "references": ex.record["references"], "model": label}) + "\n")
    tmp.replace(out)
    print(f"wrote {len(texts)} generations to {out}", flush=True)
    return out
