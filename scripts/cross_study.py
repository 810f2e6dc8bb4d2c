"""Distillation across tokenizers on the embedded task: students of the other-tokenizer teacher
with each approach, against SFT and against the same-tokenizer teacher, 3 training seeds.

    make cross-study                             # docs/results/CROSS_TOKENIZER.md (about 25 minutes on 2 cores)
    python scripts/cross_study.py --seeds 0 --out runs/cross-quick --report /tmp/C.md

Every arm trains the embedded default's student with the embedded default's recipe (1000 steps;
kd: forward KL at T = 2 with half CE) and is evaluated greedily on the 200 test prompts. The
teachers: ``tiny`` (the student's tokenizer) and ``tiny-other`` (another tokenizer: 1532 tokens,
spaces as tokens of their own, another end of text; fine-tuned from ``tiny``). Runs go to
``--out``; a finished run is reused (``scripts/teachers_study.py``'s runner).
"""

from __future__ import annotations

import os
from pathlib import Path

from reproduce import Stat
from teachers_study import family_rows, load, study

ARMS = {  # name: (label, overrides)
    "sft": ("sft (no teacher)", ["method=sft", "teacher=none"]),
    "kd-same": ("kd, teacher=tiny (the same tokenizer)", ["teacher=tiny"]),
    "kd-same-plain": ("kd, teacher=tiny, plain path (the cross runs' path)", ["teacher=tiny", "loss.fused=false"]),
    "uld": ("kd, teacher=tiny-other, loss.cross_tokenizer=uld", ["teacher=tiny-other", "loss.cross_tokenizer=uld"]),
    "span": ("kd, teacher=tiny-other, loss.cross_tokenizer=span", ["teacher=tiny-other", "loss.cross_tokenizer=span"]),
}


def report(out: Path, seeds: list[int], seconds: float) -> str:
    results = load(out, ARMS, seeds)
    step = {arm: Stat.of([r["train"]["time_s"] / r["train"]["steps"] for r in rs]).mean for arm, rs in results.items()}
    lines = ["# Distillation across tokenizers on the embedded task", "",
             f"`python scripts/cross_study.py` ({len(seeds)} training seeds: {', '.join(map(str, seeds))}; "
             f"{seconds / 60:.0f} minutes on {os.cpu_count()} CPU cores, two runs at a time). Every arm: the "
             "embedded default's student and recipe (1000 steps), greedy evaluation on the 200 test prompts; "
             "mean ± std over the training seeds. Step time: training seconds per step (two runs sharing the "
             "machine), relative to same-tokenizer kd on the same (plain) loss path.", "",
             "| arm | ROUGE-L | exact match | s / step | vs kd (plain path) |", "|---|---|---|---|---|"]
    for arm, (label, _) in ARMS.items():
        rs = results[arm]
        lines.append(f"| {label} | {Stat.of([r['rougeL'] for r in rs]).fmt(1)} | "
                     f"{Stat.of([r['exact_match'] for r in rs]).fmt(1)} | {step[arm]:.3f} | "
                     f"{step[arm] / step['kd-same-plain']:.2f} |")
    families = list(results["sft"][0]["student"]["by_family"])
    lines += ["", "ROUGE-L by family:", "", "| arm | " + " | ".join(families) + " |", "|---|" + "---|" * len(families),
              *family_rows(results, families, "rougeL")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study(__doc__, ARMS, "cross-study", "CROSS_TOKENIZER.md", report)
