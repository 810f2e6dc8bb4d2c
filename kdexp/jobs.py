"""``kdexp eval`` and ``kdexp generate``: score or sample any model on a data split.

    kdexp eval runs/2026-11-22/10-00-00_train          # a run: its final student, its data and eval settings
    kdexp eval model=path/to/hf_model data=dolly data.path=dolly.jsonl
    kdexp eval model=tiny                               # a preset (teacher/ then student/), or a hub name
    kdexp generate model=RUN_OR_MODEL generate.split=test generate.max_samples=8
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp import config
from kdexp.data import load_examples
from kdexp.errors import UserError
from kdexp.evaluation import evaluate_generation, format_table, teacher_forced_nll
from kdexp.logging import make_logger
from kdexp.models import load_model
from kdexp.rollout import GenerationSpec, generate


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
        spec.name_or_path = str(path)
        return spec, str(path)
    for group in ("teacher", "student"):
        preset = config.conf_dir() / group / f"{target}.yaml"
        if preset.is_file():
            spec = OmegaConf.merge(spec, OmegaConf.load(preset))
            return spec, f"{group}={target}"
    spec.name_or_path = str(target)
    return spec, str(target)


def _examples(cfg: DictConfig, tokenizer, split: str, max_samples: int | None) -> list:
    examples = load_examples(cfg.data, tokenizer, [split])[split]
    return examples[:max_samples] if max_samples else examples


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Evaluate one model on ``eval.split``: ROUGE-L / exact match over seeds, validation loss."""
    spec, label = resolve_model(cfg)
    issues = config.problems(cfg, keys=["data", "eval"])
    if issues:
        raise UserError("; ".join(issues))
    model, tokenizer = load_model(spec, "model")
    examples = _examples(cfg, tokenizer, cfg.eval.split, cfg.eval.max_samples)
    logger = make_logger(cfg, run_dir, job_type="eval")
    try:
        summary, generations = evaluate_generation(model, tokenizer, examples,
                                                   OmegaConf.to_container(cfg.eval, resolve=True))
        summary["loss"] = teacher_forced_nll(model, examples, tokenizer.pad_token_id,
                                             cfg.eval.batch_size)
        results = {"model": label, "split": cfg.eval.split, "data": cfg.data.name, **summary}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with (run_dir / "generations.jsonl").open("w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generations)
        table = format_table({label: summary},
                             title=f"{cfg.eval.split} split of data={cfg.data.name} ({len(examples)} prompts)")
        (run_dir / "results.md").write_text(table + "\n")
        logger.log({f"{cfg.eval.split}/{k}": summary[k] for k in ("rougeL", "exact_match", "loss")}, 0)
        logger.summary({f"{cfg.eval.split}/{k}": summary[k] for k in ("rougeL", "exact_match")})
    finally:
        logger.finish()
    print(f"\n{table}\n", flush=True)
    return results


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
        for line, row in read_rows(g.prompts):
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
