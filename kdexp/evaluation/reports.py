"""Figures, summary rows and W&B tables of ``kdexp analyze`` results (see :mod:`kdexp.analyze`).

For each analysis: ``PLOTS[name](results, path, cfg) -> path`` draws every model on one
figure; ``SUMMARIES[name](results, cfg) -> {model: {metric: value}}`` gives the few numbers a
table reports; ``long_tables(name, results)`` gives the curves in long format (one row per
model and point) for W&B line plots. ``results`` maps a model's label to what the analysis
computed for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdexp.evaluation import plots

Results = dict[str, dict[str, Any]]
Rows = dict[str, dict[str, float]]


def _mid(edges: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]


# --- exposure ---------------------------------------------------------------------------------

def _common_length(results: Results, decoding: str, wanted: int | None) -> int:
    """The l reported for every model: ``analyze.length`` if all curves reach it, else the
    largest l every curve reaches."""
    last = min(len(r[decoding]["l"]) for r in results.values())
    return min(last, int(wanted)) if wanted else last


def plot_exposure(results: Results, path: Path, cfg: DictConfig) -> Path:
    decodings = list(next(iter(results.values())))
    fig, axes = plots.figure(len(decodings), 2)
    for row, d in enumerate(decodings):
        step_ax, ex_ax = axes[2 * row], axes[2 * row + 1]
        for i, (label, res) in enumerate(results.items()):
            r, c = res[d], plots.color(i)
            steps = list(range(1, len(r["eps_t"]) + 1))
            plots.curve(step_ax, steps, r["regret_t"], r["regret_t_se"], f"{label}: student prefixes", c)
            plots.curve(step_ax, steps, r["eps_t"], r["eps_t_se"], f"{label}: teacher prefixes", c, "--")
            plots.curve(ex_ax, r["l"], r["ExAccErr"], r["ExAccErr_se"], label, c)
        counts = step_ax.twinx()  # how many sequences each step's mean rests on (thin lines)
        first = next(iter(results.values()))[d]
        counts.plot(range(1, len(first["count_teacher"]) + 1), first["count_teacher"], color="gray", lw=0.7,
                    ls="--")
        for i, res in enumerate(results.values()):
            counts.plot(range(1, len(res[d]["count_student"]) + 1), res[d]["count_student"],
                        color=plots.color(i), lw=0.7, ls=":")
        counts.set_ylabel("sequences left (thin: student's dotted, teacher's dashed)", color="gray", fontsize=7)
        counts.set_ylim(bottom=0)
        counts.tick_params(axis="y", colors="gray")
        what = f"sampling (T={cfg.analyze.temperature})" if d == "sample" else "greedy decoding"
        plots.finish(step_ax, f"per-step KL(p||q), {what}", "response step t", "KL")
        plots.finish(ex_ax, f"excess accumulated error, {what}", "length l", "ExAccErr(l) %")
        ex_ax.axhline(0, color="gray", lw=0.8)
    return plots.save(fig, path, "Exposure bias (Arora et al., 2022)")


def summary_exposure(results: Results, cfg: DictConfig) -> Rows:
    rows: Rows = {}
    for label, res in results.items():
        row: dict[str, float] = {}
        for d, r in res.items():
            n = _common_length(results, d, cfg.analyze.length)
            row.update({f"{d}_l": n, f"{d}_ExAccErr": r["ExAccErr"][n - 1], f"{d}_ExAccErr_se": r["ExAccErr_se"][n - 1],
                        f"{d}_AccErr": r["AccErr"][n - 1], f"{d}_eps": r["eps"][n - 1], f"{d}_R": r["R"][n - 1],
                        # the sequences the last step's means rest on (the fewer of the two sides)
                        f"{d}_n_at_l": min(r["count_teacher"][n - 1], r["count_student"][n - 1])})
        rows[label] = row
    return rows


# --- difficulty -------------------------------------------------------------------------------

def plot_difficulty(results: Results, path: Path, cfg: DictConfig) -> Path:
    fig, axes = plots.figure(1, 4, width=3.8)
    panels = [("kl", "KL(teacher || student)"), ("top1_agreement", "top-1 agreement %"),
              ("student_logit_std", "student logit std")]
    for i, (label, r) in enumerate(results.items()):
        x = _mid(r["edges"])
        for ax, (key, _) in zip(axes, panels, strict=False):
            plots.curve(ax, x, r[key], None, label, plots.color(i))
        axes[3].plot(x, r["count"], "o-", color=plots.color(i), label=label, ms=3)
    for ax, (_, title) in zip(axes, panels, strict=False):
        plots.finish(ax, title, "teacher uncertainty UNC = 1 - p(target)", "")
    axes[3].set_yscale("log")
    plots.finish(axes[3], "tokens per bucket", "teacher uncertainty UNC", "")
    return plots.save(fig, path, "Token difficulty (Rao et al., 2024)")


def _filled(r: dict[str, Any], key: str, end: int) -> float:
    idx = [i for i, c in enumerate(r["count"]) if c > 0]
    return r[key][idx[end]] if idx else math.nan


def summary_difficulty(results: Results, cfg: DictConfig) -> Rows:
    return {label: {"kl": r["kl_all"], "top1_agreement": r["top1_agreement_all"],
                    "kl_easiest": _filled(r, "kl", 0), "kl_hardest": _filled(r, "kl", -1),
                    "agreement_easiest": _filled(r, "top1_agreement", 0),
                    "agreement_hardest": _filled(r, "top1_agreement", -1), "tokens": r["tokens"]}
            for label, r in results.items()}


# --- calibration ------------------------------------------------------------------------------

def plot_calibration(results: Results, path: Path, cfg: DictConfig) -> Path:
    fig, axes = plots.figure(1, 2)
    for i, (label, r) in enumerate(results.items()):
        c = plots.color(i)
        plots.reliability(axes[0], r["edges"], r["confidence"], r["accuracy"],
                          f"{label} (ECE {100 * r['ece']:.1f}%)", c)
        axes[1].plot(_mid(r["edges"]), [k / max(r["n"], 1) for k in r["count"]], "o-", color=c, label=label, ms=3)
    plots.finish(axes[0], "reliability diagram", "confidence (max probability)", "accuracy")
    plots.finish(axes[1], "predictions per confidence bin", "confidence", "fraction of tokens")
    return plots.save(fig, path, "Calibration of next-token predictions")


def summary_calibration(results: Results, cfg: DictConfig) -> Rows:
    def overall(r: dict[str, Any], key: str) -> float:
        pairs = [(k, v) for k, v in zip(r["count"], r[key], strict=True) if k > 0]
        return sum(k * v for k, v in pairs) / max(sum(k for k, _ in pairs), 1)

    return {label: {"ece": 100 * r["ece"], "mce": 100 * r["mce"], "accuracy": 100 * overall(r, "accuracy"),
                    "confidence": 100 * overall(r, "confidence"), "tokens": r["n"]}
            for label, r in results.items()}


# --- diversity --------------------------------------------------------------------------------

def plot_diversity(results: Results, path: Path, cfg: DictConfig) -> Path:
    fig, axes = plots.figure(1, 2)
    ns = sorted(int(k.split("_")[1]) for k in next(iter(results.values())) if k.startswith("distinct_")
                and not k.endswith("_se"))
    plots.bars(axes[0], [f"distinct-{n}" for n in ns],
               {label: [r[f"distinct_{n}"] for n in ns] for label, r in results.items()},
               {label: [r[f"distinct_{n}_se"] for n in ns] for label, r in results.items()})
    plots.bars(axes[1], ["self-BLEU"], {label: [r["self_bleu"]] for label, r in results.items()},
               {label: [r["self_bleu_se"]] for label, r in results.items()})
    plots.finish(axes[0], f"distinct-n among {cfg.analyze.n_samples} samples per prompt", "", "distinct n-grams / n-grams")
    plots.finish(axes[1], "self-BLEU (lower: more diverse)", "", "BLEU")
    return plots.save(fig, path, "Diversity of samples")


def summary_diversity(results: Results, cfg: DictConfig) -> Rows:
    keys = [k for k in next(iter(results.values())) if k.startswith("distinct_") and not k.endswith("_se")]
    return {label: {**{k: r[k] for k in keys}, "self_bleu": r["self_bleu"], "mean_words": r["mean_words"]}
            for label, r in results.items()}


# --- speculative ------------------------------------------------------------------------------

def plot_speculative(results: Results, path: Path, cfg: DictConfig) -> Path:
    fig, axes = plots.figure(1, 2)
    for i, (label, r) in enumerate(results.items()):
        s = r["per_step"]
        plots.curve(axes[0], s["step"], s["mean"], s["se"], f"{label} (mean {r['alpha']:.3f})", plots.color(i))
    plots.finish(axes[0], "acceptance rate per response step", "response step", "alpha = sum min(p, q)")
    axes[0].set_ylim(0, 1.02)
    gammas = list(next(iter(results.values()))["expected_tokens"])
    plots.bars(axes[1], [f"γ={g}" for g in gammas],
               {label: [r["expected_tokens"][g] for g in gammas] for label, r in results.items()})
    plots.finish(axes[1], "expected tokens per teacher call", "draft length", "tokens")
    return plots.save(fig, path, "The student as a speculative-decoding draft for the teacher")


def summary_speculative(results: Results, cfg: DictConfig) -> Rows:
    return {label: {"alpha": r["alpha"], "empirical": r["empirical"],
                    **{f"tokens_per_call_g{g}": v for g, v in r["expected_tokens"].items()}}
            for label, r in results.items()}


# --- curves -----------------------------------------------------------------------------------

def plot_curves(results: Results, path: Path, cfg: DictConfig) -> Path:
    fig, axes = plots.figure(1, 1, width=6.0)
    for i, (label, r) in enumerate(results.items()):
        c = plots.color(i)
        for name, style in (("teacher_forced", "--"), ("free_running", "-")):
            s = r[name]
            plots.curve(axes[0], s["step"], s["mean"], s["se"], f"{label}: {name.replace('_', '-')}", c, style)
    plots.finish(axes[0], "KL(p_teacher || q_student) along the response", "response step", "KL")
    return plots.save(fig, path, "Per-position KL: reference (teacher-forced) vs own (free-running) prefixes")


def summary_curves(results: Results, cfg: DictConfig) -> Rows:
    return {label: {"kl_teacher_forced": r["teacher_forced"]["kl"], "kl_free_running": r["free_running"]["kl"],
                    "steps_free_running": len(r["free_running"]["step"])}
            for label, r in results.items()}


# --- routing ----------------------------------------------------------------------------------

def plot_routing(results: Results, path: Path, cfg: DictConfig) -> Path:
    fig, axes = plots.figure(1, 3)
    styles = ["-", "--", ":", "-."]
    for i, (label, r) in enumerate(results.items()):
        for layer, s in enumerate(r["per_step"]):
            plots.curve(axes[0], s["step"], s["mean"], s["se"], f"{label}: layer {layer}", plots.color(i),
                        styles[layer % len(styles)])
    axes[0].set_ylim(0, 1.02)
    plots.finish(axes[0], "experts chosen: reference vs own prefixes", "response step", "shared experts / k")
    # models of other shapes (layers, experts) side by side: the missing bars are left empty
    n_layers = max(r["layers"] for r in results.values())
    n_experts = max(r["experts"] for r in results.values())

    def padded(values: list[float], n: int) -> list[float]:
        return [*values, *[math.nan] * (n - len(values))]

    # entropies of routers that score differently (softmax, normalized sigmoids) are on other scales: named
    scored = len({r.get("scoring") for r in results.values()}) > 1

    def name(label: str, r: dict) -> str:
        return f"{label} ({r.get('scoring')})" if scored else label

    plots.bars(axes[1], [f"layer {j}" for j in range(n_layers)],
               {f"{name(label, r)}: {kind.replace('_', '-')}": padded(r["entropy"][kind], n_layers)
                for label, r in results.items() for kind in ("teacher_forced", "free_running")})
    plots.finish(axes[1], "router entropy", "", "nats")
    groups = [f"L{j}E{e}" for j in range(n_layers) for e in range(n_experts)]
    plots.bars(axes[2], groups, {label: padded([x for layer in r["load"]["free_running"]
                                                for x in padded(layer, n_experts)], len(groups))
                                 for label, r in results.items()})
    for r in results.values():
        axes[2].axhline(1 / r["experts"], color="gray", lw=0.8, ls=":")
    plots.finish(axes[2], "load per expert, own prefixes (dotted: balanced)", "layer, expert", "share of assignments")
    return plots.save(fig, path, "MoE routing: teacher-forced (reference) vs free-running (own) prefixes")


def summary_routing(results: Results, cfg: DictConfig) -> Rows:
    rows: Rows = {}
    for label, r in results.items():
        row = {"agreement": sum(r["agreement"]) / len(r["agreement"]),
               **{f"agreement_layer{j}": a for j, a in enumerate(r["agreement"])}}
        for kind, short in (("teacher_forced", "tf"), ("free_running", "fr")):
            row[f"entropy_{short}"] = sum(r["entropy"][kind]) / len(r["entropy"][kind])
            # the busiest expert's load relative to a balanced one (1: balanced; E: one expert takes all)
            row[f"max_load_{short}"] = max(max(layer) for layer in r["load"][kind]) * r["experts"]
        rows[label] = row
    return rows


PLOTS = {"exposure": plot_exposure, "difficulty": plot_difficulty, "calibration": plot_calibration,
         "diversity": plot_diversity, "speculative": plot_speculative, "curves": plot_curves,
         "routing": plot_routing}
SUMMARIES = {"exposure": summary_exposure, "difficulty": summary_difficulty,
             "calibration": summary_calibration, "diversity": summary_diversity,
             "speculative": summary_speculative, "curves": summary_curves, "routing": summary_routing}


def long_tables(name: str, results: Results) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The plotted curves, one row per (model, point), for W&B tables and line plots."""
    rows: list[list[Any]] = []
    if name == "exposure":
        columns = ["model", "decoding", "l", "ExAccErr", "AccErr", "eps_t", "regret_t"]
        for label, res in results.items():
            for d, r in res.items():
                rows += [[label, d, r["l"][i], r["ExAccErr"][i], r["AccErr"][i], r["eps_t"][i], r["regret_t"][i]]
                         for i in range(len(r["l"]))]
    elif name == "difficulty":
        columns = ["model", "bucket", "unc", "count", "kl", "top1_agreement", "student_logit_std"]
        for label, r in results.items():
            rows += [[label, i, r["unc"][i], r["count"][i], r["kl"][i], r["top1_agreement"][i],
                      r["student_logit_std"][i]] for i in range(len(r["count"]))]
    elif name == "calibration":
        columns = ["model", "bin", "confidence", "accuracy", "count"]
        for label, r in results.items():
            rows += [[label, i, r["confidence"][i], r["accuracy"][i], r["count"][i]] for i in range(len(r["count"]))]
    elif name == "speculative":
        columns = ["model", "step", "alpha", "count"]
        for label, r in results.items():
            s = r["per_step"]
            rows += [[label, t, m, n] for t, m, n in zip(s["step"], s["mean"], s["count"], strict=True)]
    elif name == "curves":
        columns = ["model", "prefixes", "step", "kl", "count"]
        for label, r in results.items():
            for prefix in ("teacher_forced", "free_running"):
                s = r[prefix]
                rows += [[label, prefix, t, m, n] for t, m, n in zip(s["step"], s["mean"], s["count"], strict=True)]
    elif name == "routing":
        columns = ["model", "layer", "step", "agreement", "count"]
        for label, r in results.items():
            for layer, s in enumerate(r["per_step"]):
                rows += [[label, layer, t, m, n] for t, m, n in zip(s["step"], s["mean"], s["count"], strict=True)]
    else:
        return {}
    clean = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row] for row in rows]
    return {"curves": (columns, clean)}


def markdown(name: str, rows: Rows) -> str:
    """The summary rows as a markdown table (numbers to 3 decimals, nan as n/a)."""
    columns = list(next(iter(rows.values())))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.3f}"
        return str(v)

    lines = [f"### kdexp analyze {name}", "", "| model | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(row[c]) for c in columns) + " |" for label, row in rows.items()]
    return "\n".join(lines)
