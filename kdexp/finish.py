"""The end of a run and the validations on the way: the final student saved as a Hugging Face
directory, and the final evaluation (the same scoring as ``kdexp eval RUN``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from kdexp.engine import state_dict
from kdexp.evaluation import evaluate_generation, format_table, teacher_forced_nll


def validate(cfg: DictConfig, model: torch.nn.Module, tokenizer, valid: list) -> dict[str, float]:
    """Validation loss on the whole split (a mean per token or per sequence, ``eval.loss_mean``,
    as ``kdexp eval`` reports it), ROUGE-L / exact match on its first examples (one seed)."""
    subset = valid[: cfg.train.eval_samples]
    eval_cfg = {**OmegaConf.to_container(cfg.eval, resolve=True), "seeds": list(cfg.eval.seeds)[:1]}
    summary, _ = evaluate_generation(model, tokenizer, subset, eval_cfg, desc="validate")
    return {"valid/loss": teacher_forced_nll(model, valid, tokenizer.pad_token_id,
                                             cfg.eval.batch_size, per=cfg.eval.loss_mean),
            "valid/rougeL": summary["rougeL"], "valid/exact_match": summary["exact_match"]}


def part_of(accelerator: Accelerator, engine: torch.nn.Module, part: str | None,
            ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A submodule of the engine's model and its full state dict (gathered under ZeRO-3)."""
    state = state_dict(accelerator, engine)  # ZeRO-3, FSDP2: gathered on the main process only
    unwrapped = accelerator.unwrap_model(engine)
    if part is None:
        return unwrapped, state
    return getattr(unwrapped, part), {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(f"{part}.")}


def save_final(accelerator: Accelerator, engine: torch.nn.Module, tokenizer, final: Path,
               part: str | None = None) -> None:
    """The final student as a Hugging Face directory (LoRA merged in; the adapter kept beside).

    ``part``: the student is that submodule of the engine's model (online KD trains a pair).
    """
    from kdexp.models import small_bars
    unwrapped, state = part_of(accelerator, engine, part)
    if accelerator.is_main_process:
        tensors = state.values() if state else unwrapped.parameters()  # ZeRO-3: the gathered state
        with small_bars(sum(t.numel() * t.element_size() for t in tensors)):
            if hasattr(unwrapped, "merge_and_unload"):  # a PEFT model
                unwrapped.save_pretrained(final.with_name("final_adapter"), state_dict=state)
                copy.deepcopy(unwrapped).merge_and_unload().save_pretrained(final)
            else:
                unwrapped.save_pretrained(final, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(final)
    accelerator.wait_for_everyone()


def final_evaluation(cfg: DictConfig, run_dir: Path, student: torch.nn.Module, tokenizer,
                     teacher: torch.nn.Module | None, teacher_as_loaded: bool = False) -> dict[str, Any]:
    """Evaluate the student (and the teacher) on the test split, or on every set of
    ``eval.sets`` (then the top-level numbers are the average over the sets); write and return
    the results. The scoring is ``kdexp eval``'s own (:func:`kdexp.jobs.evaluate`: the run's
    data with ``eval.data`` applied, not the training encoding). ``teacher_as_loaded``: the
    teacher was not trained in the run, so its scores are shared with every run that evaluates
    it the same way (the jobs of a multirun evaluate it once)."""
    from kdexp import jobs

    models = {"student": student}
    if teacher is not None and cfg.eval.teacher:
        models = {"teacher": teacher, "student": student}
    gen_dir = run_dir / "generations"
    gen_dir.mkdir(exist_ok=True)
    several = bool(cfg.eval.get("sets"))

    def write(who: str, name: str, generations: list) -> None:
        with (gen_dir / f"{name if several else 'test'}_{who}.jsonl").open("w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generations)

    from kdexp.models import model_identity
    shared = {"teacher": model_identity(cfg.teacher)} if teacher_as_loaded and "teacher" in models else None
    scored = jobs.evaluate(cfg, models, tokenizer, jobs.eval_sets(cfg), write, shared)
    top = ("rougeL", "rougeL_std", "exact_match", "exact_match_std")
    if several:
        results: dict[str, Any] = {"split": "test", "eval": cfg.eval.name, **scored}
        tables = [jobs.sets_table(who, scored[who]["sets"], cfg.eval.name) for who in models]
        (run_dir / "results.md").write_text("\n\n".join(tables) + "\n")
    else:
        rows = {who: scored[who]["sets"][cfg.data.name] for who in models}
        table = format_table(rows, title=f"test split of data={cfg.data.name} ({rows['student']['n']} prompts)")
        (run_dir / "results.md").write_text(table + "\n")
        results = {**{k: rows["student"][k] for k in top}, "split": "test", "student": rows["student"]}
        if "teacher" in rows:
            results["teacher"] = rows["teacher"]
        return results
    results.update({k: scored["student"][k] for k in top})
    return results
