"""Evaluate a model on a split: generation metrics over seeds, and teacher-forced loss."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdexp.data.encode import Example, collate_train
from kdexp.evaluation.metrics import exact_match, rouge_l
from kdexp.losses.objective import IGNORE_INDEX, cross_entropy
from kdexp.rollout import GenerationSpec, generate

METRICS = ("rougeL", "exact_match")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def eval_seeds(cfg: Mapping[str, Any]) -> list[int]:
    """The seeds to generate with; one pass suffices for greedy decoding."""
    seeds = [int(s) for s in cfg["seeds"]]
    return seeds if cfg["do_sample"] else seeds[:1]


def evaluate_generation(model: torch.nn.Module, tokenizer, examples: Sequence[Example],
                        cfg: Mapping[str, Any], desc: str = "eval",
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ROUGE-L and exact match (mean and std over ``cfg.seeds``), and every generation.

    The summary holds ``rougeL``, ``rougeL_std``, ``exact_match``, ``exact_match_std``, ``n``,
    ``seeds``, ``gen_length`` (mean new tokens), ``per_seed`` and, when records carry a
    ``family`` (the toy task), ``by_family`` (means over seeds).
    """
    spec = GenerationSpec.from_cfg(cfg)
    per_seed, generations = [], []
    family_scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in eval_seeds(cfg):
        texts, lengths = generate(model, tokenizer, examples, spec, seed=seed,
                                  batch_size=int(cfg["batch_size"]), desc=f"{desc} seed {seed}")
        scores = {"rougeL": [], "exact_match": []}
        for ex, text, length in zip(examples, texts, lengths, strict=True):
            refs = ex.record["references"]
            row = {"rougeL": rouge_l(text, refs), "exact_match": exact_match(text, refs)}
            for k, v in row.items():
                scores[k].append(v)
                if "family" in ex.record:
                    family_scores[ex.record["family"]][k].append(v)
            generations.append({"seed": seed, "prompt": ex.record["prompt"], "output": text,
                                "references": refs, "length": length, **row,
                                **({"family": ex.record["family"]} if "family" in ex.record else {})})
        per_seed.append({"seed": seed, "gen_length": statistics.fmean(lengths),
                         **{k: statistics.fmean(v) for k, v in scores.items()}})
    summary: dict[str, Any] = {"n": len(examples), "seeds": [p["seed"] for p in per_seed]}
    for k in METRICS:
        summary[k], summary[f"{k}_std"] = _mean_std([p[k] for p in per_seed])
    summary["gen_length"] = statistics.fmean(p["gen_length"] for p in per_seed)
    summary["per_seed"] = per_seed
    if family_scores:
        summary["by_family"] = {f: {k: statistics.fmean(v) for k, v in s.items()}
                                for f, s in sorted(family_scores.items())}
    return summary, generations


@torch.no_grad()
def teacher_forced_nll(model: torch.nn.Module, examples: Sequence[Example], pad_id: int,
                       batch_size: int = 32, per: str = "token") -> float:
    """The validation loss: the mean negative log-likelihood of the response tokens, over all
    tokens (``per="token"``) or of each sequence's mean over sequences (``per="sequence"``,
    MiniLLM's evaluate_main.py)."""
    if per not in ("token", "sequence"):
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate_train(examples[start:start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            targets = batch["targets"].to(device)
            logits = logits[:, -targets.shape[1]:]  # a P-tuned model's virtual tokens come first
            nll = cross_entropy(logits, targets)  # [B, T], 0 where ignored
            if per == "token":
                total += nll.sum().item()
                count += int((targets != IGNORE_INDEX).sum())
            else:
                n = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
                total += (nll.sum(-1) / n).sum().item()
                count += len(n)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def mean_std(mean: float, std: float, n: int, digits: int = 2) -> str:
    """``mean ± std`` over ``n`` seeds; the mean alone for one seed (no spread to show)."""
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(rows: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """A markdown table: one row per model, ROUGE-L and exact match as mean ± std over seeds."""
    lines = ([f"### {title}", ""] if title else []) + [
        "| model | ROUGE-L | exact match | n | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        n = len(r["seeds"])
        lines.append(f"| {name} | {mean_std(r['rougeL'], r['rougeL_std'], n)} "
                     f"| {mean_std(r['exact_match'], r['exact_match_std'], n)} | {r['n']} | {n} |")
    return "\n".join(lines)
