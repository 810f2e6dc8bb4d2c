"""Distillation across tokenizers on the embedded task: students of the other-tokenizer teacher
with each approach, against SFT and against the same-tokenizer teacher, 3 training seeds.

    make cross-study                             # docs/results/CROSS_TOKENIZER.md (about 37 minutes on 2 cores)
    python scripts/cross_study.py --seeds 0 --out runs/cross-quick --report /tmp/C.md

Every arm trains the embedded default's student with the embedded default's recipe (1000 steps;
kd: forward KL at T = 2 with half CE) and is evaluated greedily on the 200 test prompts. The
teachers: ``tiny`` (the student's tokenizer) and ``tiny-other`` (another tokenizer: 1532 tokens,
spaces as tokens of their own, another end of text; fine-tuned from ``tiny``). Runs go to
``--out``; a finished run is reused (``scripts/teachers_study.py``'s runner).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reproduce import Job, Stat
from teachers_study import COMMON, family_rows, load, study

ARMS = {  # name: (label, overrides)
    "sft": ("sft (no teacher)", ["method=sft", "teacher=none"]),
    "kd-same": ("kd, teacher=tiny (the same tokenizer)", ["teacher=tiny"]),
    "kd-same-plain": ("kd, teacher=tiny, plain path (the cross runs' path)", ["teacher=tiny", "loss.fused=false"]),
    "uld": ("kd, teacher=tiny-other, loss.cross_tokenizer=uld", ["teacher=tiny-other", "loss.cross_tokenizer=uld"]),
    "span": ("kd, teacher=tiny-other, loss.cross_tokenizer=span", ["teacher=tiny-other", "loss.cross_tokenizer=span"]),
    "span-matched": ("kd, teacher=tiny-other, loss.cross_tokenizer=span loss.matched_weight=1",
                     ["teacher=tiny-other", "loss.cross_tokenizer=span", "loss.matched_weight=1.0"]),
}


TIMED = ("kd-same-plain", "uld", "span")  # step times measured alone
TIMING_STEPS = 200


def timing_jobs(out: Path) -> list[Job]:
    """Each timed arm for 200 steps, one run at a time (nothing else on the machine), one thread."""
    jobs = []
    for arm in TIMED:
        run = out / f"timing-{arm}"
        jobs.append(Job(["train", *ARMS[arm][1], *COMMON, f"train.max_steps={TIMING_STEPS}", "eval.max_samples=8",
                         f"hydra.run.dir={run}"], run, run / "results.json", 1.0, out / "logs" / f"timing-{arm}.log"))
    return jobs


def report(out: Path, seeds: list[int], seconds: float) -> str:
    results = load(out, ARMS, seeds)
    timed = {arm: json.loads((out / f"timing-{arm}" / "results.json").read_text())["train"] for arm in TIMED}
    step = {arm: t["time_s"] / t["steps"] for arm, t in timed.items()}
    lines = ["# Distillation across tokenizers on the embedded task", "",
             f"`python scripts/cross_study.py` ({len(seeds)} training seeds: {', '.join(map(str, seeds))}; "
             f"{seconds / 60:.0f} minutes on {os.cpu_count()} CPU cores, two runs at a time). Every arm: the "
             "embedded default's student and recipe (1000 steps), greedy evaluation on the 200 test prompts; "
             f"mean ± std over the training seeds. Step time: training seconds per step of a {TIMING_STEPS}-step run "
             "of the arm alone on the machine (one thread, runs one after another), relative to same-tokenizer "
             "kd on the same (plain) loss path.", "",
             "| arm | ROUGE-L | exact match | s / step | vs kd (plain path) |", "|---|---|---|---|---|"]
    for arm, (label, _) in ARMS.items():
        rs = results[arm]
        time = f"{step[arm]:.3f} | {step[arm] / step['kd-same-plain']:.2f}" if arm in step else "- | -"
        lines.append(f"| {label} | {Stat.of([r['rougeL'] for r in rs]).fmt(1)} | "
                     f"{Stat.of([r['exact_match'] for r in rs]).fmt(1)} | {time} |")
    families = list(results["sft"][0]["student"]["by_family"])
    lines += ["", "ROUGE-L by family:", "", "| arm | " + " | ".join(families) + " |", "|---|" + "---|" * len(families),
              *family_rows(results, families, "rougeL")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study(__doc__, ARMS, "cross-study", "CROSS_TOKENIZER.md", report, alone=timing_jobs)
