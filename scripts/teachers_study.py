"""Several teachers on the embedded task: students of each single teacher and of every
``teachers.rule``, 3 training seeds, scored overall and by instruction family.

    make teachers-study                          # docs/results/TEACHERS.md (about 35 minutes on 2 cores)
    python scripts/teachers_study.py --seeds 0 --out runs/teachers-quick --report /tmp/T.md

The teachers are the bundled specialists (``teacher=tiny-b``: fact, describe, arith, category;
``teacher=tiny-c``: repeat, reverse, count, story; both fine-tuned from ``teacher=tiny``, which is
also run alone and is their raw checkpoint for ``relative``). Every arm trains the embedded
default's student with the embedded default's recipe (``method=kd``, forward KL at T = 2, 1000
steps) and is evaluated greedily on the 200 test prompts. Runs go to ``--out`` (one directory per
arm and seed; logs in ``--out/logs``); a finished run (``results.json``) is reused. Two runs at a
time, one thread each (``scripts/reproduce.py``'s runner).
The report is computed from the run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from reproduce import Job, Stat, run_jobs  # the reproduction study's runner and statistics

ROOT = Path(__file__).resolve().parents[1]
B_FAMILIES = ["fact", "describe", "arith", "category"]  # kdexp/assets/build.py SPECIALISTS["b"]
ROUTE = "{" + ", ".join(f"{f}: tiny-b" for f in B_FAMILIES) + "}"
PAIR = "teachers.names=[tiny-b,tiny-c]"
ARMS = {  # name: (label, overrides)
    "tiny": ("teacher=tiny (the generalist, raw checkpoint of both)", ["teacher=tiny"]),
    "tiny-b": ("teacher=tiny-b alone", ["teacher=tiny-b"]),
    "tiny-c": ("teacher=tiny-c alone", ["teacher=tiny-c"]),
    "route": ("route (each family to its specialist)",
              ["teachers.rule=route", PAIR, "teachers.route_key=family", f"teachers.route_map={ROUTE}",
               "teachers.route_default=tiny-c"]),
    "mixture": ("mixture (equal weights)", ["teachers.rule=mixture", PAIR]),
    "relative": ("relative (tiny-b corrected by raw student / tiny, alpha 1)",
                 ["teachers.rule=relative", "teachers.names=[tiny-b,tiny]", "teachers.alpha=1.0"]),
    "mot": ("mot (branches of 50 steps, 10 rounds)", ["teachers.rule=mot", PAIR, "teachers.branch_steps=50"]),
}
COMMON = ["logger=none", "eval=greedy", "eval.teacher=false", "train.num_threads=1"]


def job(out: Path, arm: str, seed: int, arms: dict = ARMS) -> Job:
    """One arm's run for one seed, as the reproduction study runs its own (finished: reused)."""
    run = out / f"{arm}-seed{seed}"
    return Job(["train", *arms[arm][1], *COMMON, f"seed={seed}", f"hydra.run.dir={run}"], run, run / "results.json",
               1.0, out / "logs" / f"{arm}-seed{seed}.log")


def mean_std(values: list[float]) -> str:
    return Stat.of(values).fmt(1)


def load(out: Path, arms: dict, seeds: list[int]) -> dict[str, list[dict]]:
    """Each arm's results.json, one per seed."""
    return {arm: [json.loads((out / f"{arm}-seed{s}" / "results.json").read_text()) for s in seeds] for arm in arms}


def family_rows(results: dict[str, list[dict]], families: list[str], metric: str) -> list[str]:
    """One table row per arm: ``metric``'s mean ± std over the seeds in each family."""
    return [f"| {arm} | " + " | ".join(mean_std([r["student"]["by_family"][f][metric] for r in rs]) for f in families)
            + " |" for arm, rs in results.items()]


def report(out: Path, seeds: list[int], seconds: float) -> str:
    results = load(out, ARMS, seeds)
    families = list(next(iter(results.values()))[0]["student"]["by_family"])
    lines = ["# Several teachers on the embedded task", "",
             f"`python scripts/teachers_study.py` ({len(seeds)} training seeds: {', '.join(map(str, seeds))}; "
             f"{seconds / 60:.0f} minutes on {os.cpu_count()} CPU cores). Every arm: the embedded default "
             "(`method=kd`, fkl at T = 2, 1000 steps, the tiny student from a random init), greedy "
             "evaluation on the 200 test prompts; mean ± std over the training seeds. The teachers: "
             "`tiny-b` (fine-tuned on fact, describe, arith, category), `tiny-c` (repeat, reverse, count, "
             "story), both from `tiny`.", "",
             "| arm | ROUGE-L | exact match |", "|---|---|---|"]
    for arm, (label, _) in ARMS.items():
        rs = results[arm]
        lines.append(f"| {label} | {mean_std([r['rougeL'] for r in rs])} | {mean_std([r['exact_match'] for r in rs])} |")
    for metric, title in (("rougeL", "ROUGE-L"), ("exact_match", "exact match")):
        lines += ["", f"{title} by family (b: a family of tiny-b's fine-tuning, c: of tiny-c's):", "",
                  "| arm | " + " | ".join(f"{f} ({'b' if f in B_FAMILIES else 'c'})" for f in families) + " |",
                  "|---|" + "---|" * len(families), *family_rows(results, families, metric)]
    return "\n".join(lines) + "\n"


def study(doc: str, arms: dict, name: str, report_name: str, make_report, alone=None) -> None:
    """The command line of a study of ``arms`` (3 seeds by default): run, then report.
    ``alone(out)``: more jobs, run one at a time after the others (timings)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(arms), choices=list(arms))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / name)
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / report_name)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    start = time.time()
    failed = run_jobs([job(args.out, arm, seed, arms) for arm in args.arms for seed in args.seeds], args.workers)
    if alone is not None and not failed:
        failed = run_jobs(alone(args.out), 1)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (logs in {args.out / 'logs'}): no report")
    if args.arms == list(arms):
        args.report.write_text(make_report(args.out, args.seeds, time.time() - start))
        print(f"report: {args.report}")


if __name__ == "__main__":
    study(__doc__, ARMS, "teachers-study", "TEACHERS.md", report)
