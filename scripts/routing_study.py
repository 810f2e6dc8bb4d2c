"""Routing of mixture-of-experts students: an SFT and a KD student of the tiny teacher, their
experts under reference (teacher-forced) and own (free-running) prefixes, 3 seeds.

    make routing-study                             # docs/results/ROUTING.md and routing.png (about 6 minutes on 2 cores)
    python scripts/routing_study.py --seeds 0 --out runs/routing-quick --report /tmp/ROUTING.md

Per seed: ``student=tiny-moe`` (Mixtral architecture, 4 experts per layer, 2 per token, the
load-balancing loss at 0.01) trained with the embedded default's recipe (1000 steps) as
``method=sft`` and as ``method=kd`` (forward KL at T = 2 with half CE), then ``kdexp analyze
routing`` on both (64 test prompts, 4 samples each at temperature 1; the per-step curves stop
where fewer than 30 response pairs are left).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from osd_study import main as study
from osd_study import mean_se, mean_std
from reproduce import Job

METHODS = {"sft": ["method=sft"], "kd": ["method=kd"]}
COMMON = ["student=tiny-moe", "logger=none", "eval=greedy", "eval.teacher=false", "train.num_threads=1"]


def jobs(out: Path, seeds: list[int]) -> list[Job]:
    out_jobs = []
    for seed in seeds:
        runs = []
        for name, overrides in METHODS.items():
            run = out / f"{name}-seed{seed}"
            runs.append(run)
            out_jobs.append(Job(["train", *overrides, *COMMON, f"seed={seed}", f"hydra.run.dir={run}"], run,
                                run / "results.json", 3.0, out / "logs" / f"{name}-seed{seed}.log"))
        run = out / f"routing-seed{seed}"
        out_jobs.append(Job(["analyze", "routing", *map(str, runs), f"analyze.labels=[{','.join(METHODS)}]",
                             "logger=none", f"analyze.seed={seed}", f"hydra.run.dir={run}"], run,
                            run / "routing.json", 1.0, out / "logs" / f"routing-seed{seed}.log",
                            tuple(r / "results.json" for r in runs)))
    return out_jobs


def report(out: Path, seeds: list[int], figure: Path) -> str:
    records = [json.loads((out / f"routing-seed{s}" / "routing.json").read_text()) for s in seeds]
    scores = {m: [json.loads((out / f"{m}-seed{s}" / "results.json").read_text()) for s in seeds] for m in METHODS}
    first = records[0]["results"]["sft"]
    lines = ["# Routing of mixture-of-experts students", "",
             f"`python scripts/routing_study.py` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; about 6 minutes "
             f"on {os.cpu_count()} CPU cores). `student=tiny-moe`: {first['layers']} layers of "
             f"{first['experts']} experts, {first['top_k']} per token. Mean ± std over the seeds. Agreement: the share "
             f"of the {first['top_k']} experts chosen ("
             f"{'read from the routers' if first['chosen'] == 'router' else 'the top k of the routers'}) "
             "alike where the t-th response token is predicted, after "
             "the reference's first t - 1 tokens (teacher-forced) and after the student's own (free-running), "
             "averaged over every step both responses reach (step 1, from the prompt alone, agrees by construction). "
             "Entropy: the router's, in nats (log 4 = 1.386 is uniform). Max load: the busiest expert's share of the "
             "assignments x the number of experts (1: balanced).", "",
             "| student | ROUGE-L | agreement, layer 0 | agreement, layer 1 | entropy, ref. | entropy, own | "
             "max load, ref. | max load, own |", "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rows = [r["summary"][m] for r in records]
        lines.append(f"| {m} | {mean_std([s['rougeL'] for s in scores[m]], 1)} | "
                     f"{mean_std([r['agreement_layer0'] for r in rows])} | {mean_std([r['agreement_layer1'] for r in rows])} | "
                     f"{mean_std([r['entropy_tf'] for r in rows])} | {mean_std([r['entropy_fr'] for r in rows])} | "
                     f"{mean_std([r['max_load_tf'] for r in rows], 2)} | {mean_std([r['max_load_fr'] for r in rows], 2)} |")
    lines += ["", "![agreement of the experts chosen per response step, mean over the seeds](routing.png)", ""]
    curves(records, figure)
    return "\n".join(lines)


def curves(records: list[dict], path: Path) -> None:
    """The mean per-step agreement over the seeds, per student and layer."""
    from kdexp.evaluation import plots

    fig, axes = plots.figure(1, 1, width=6.5)
    for i, m in enumerate(METHODS):
        for layer in range(records[0]["results"][m]["layers"]):
            mean, se = mean_se([r["results"][m]["per_step"][layer]["mean"] for r in records])
            plots.curve(axes[0], list(range(1, len(mean) + 1)), mean, se, f"{m}: layer {layer}", plots.color(i),
                        "-" if layer == 0 else "--")
    axes[0].set_ylim(0, 1.02)
    plots.finish(axes[0], "experts chosen alike, reference vs own prefixes", "response step", "shared experts / k")
    plots.save(fig, path, "MoE routing along the response (mean ± s.e. over seeds)")


if __name__ == "__main__":
    study(__doc__, jobs, report, "routing", "ROUTING.md")
