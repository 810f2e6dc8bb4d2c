"""Sparse teacher targets on the embedded task: students of the dense (live) teacher, of top-k
caches (k = 16, 64) and of sampled caches (n = 4, 12, 32 draws per position), 3 training seeds:
ROUGE-L, exact match and calibration, against the bytes each target takes per token.

    make sparse-study                            # docs/results/SPARSE_TEACHER.md (about 15 minutes on 2 cores)
    python scripts/sparse_study.py --seeds 0 --out runs/sparse-quick --report /tmp/S.md

Every arm trains the embedded default's student with the embedded default's recipe (``method=kd``:
half CE, forward KL at T = 2, 1000 steps) and is evaluated greedily on the 200 test prompts;
calibration is ``kdexp analyze calibration`` of each seed's students on the test references
(teacher-forced next-token predictions, 15 bins). The caches are built first, one at a time,
into ``--out/cache`` (each cache serves every seed: the draws are those of
``teacher.sample_seed=0``); their build times come from their ``meta.json``. A finished run is
reused (``scripts/reproduce.py``'s runner).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from reproduce import Job, Stat, run_jobs
from teachers_study import COMMON, ROOT, load

TARGETS = {  # name: (label, the teacher's overrides for cache-teacher and train)
    "dense": ("dense (live teacher)", []),
    "top16": ("top-16 cache", ["teacher.top_k=16"]),
    "top64": ("top-64 cache", ["teacher.top_k=64"]),
    "sampled4": ("sampled, n = 4", ["teacher.sparse=sampled", "teacher.samples=4"]),
    "sampled12": ("sampled, n = 12", ["teacher.sparse=sampled", "teacher.samples=12"]),
    "sampled32": ("sampled, n = 32", ["teacher.sparse=sampled", "teacher.samples=32"]),
}


def cached(arm: str) -> bool:
    return arm != "dense"


def jobs(out: Path, seeds: list[int]) -> tuple[list[Job], list[Job], list[Job]]:
    """The cache builds, the training runs (after their cache) and each seed's calibration."""
    where = f"rollout.cache_dir={out / 'cache'}"
    builds = {arm: Job(["cache-teacher", *extra, where, "logger=none", f"hydra.run.dir={out / 'build' / arm}"],
                       out / "build" / arm, out / "build" / arm / "cache.json", 1.0, out / "logs" / f"build-{arm}.log")
              for arm, (_, extra) in TARGETS.items() if cached(arm)}
    runs, analyses = [], []
    for seed in seeds:
        done = []
        for arm, (_, extra) in TARGETS.items():
            run = out / f"{arm}-seed{seed}"
            source = ["teacher.source=cache", where, *extra] if cached(arm) else []
            runs.append(Job(["train", *source, *COMMON, f"seed={seed}", f"hydra.run.dir={run}"], run,
                            run / "results.json", 1.0, out / "logs" / f"{arm}-seed{seed}.log",
                            (builds[arm].done,) if cached(arm) else ()))
            done.append(run)
        target = out / f"calibration-seed{seed}"
        analyses.append(Job(["analyze", "calibration", *map(str, done), f"analyze.labels=[{','.join(TARGETS)}]",
                             "analyze.max_samples=null", "logger=none", "train.num_threads=1",
                             f"hydra.run.dir={target}"], target, target / "calibration.json", 0.2,
                            out / "logs" / f"calibration-seed{seed}.log", tuple(r / "results.json" for r in done)))
    return list(builds.values()), runs, analyses


def report(out: Path, seeds: list[int], seconds: float) -> str:
    results = load(out, TARGETS, seeds)
    calib = [json.loads((out / f"calibration-seed{s}" / "calibration.json").read_text())["summary"] for s in seeds]
    metas = {arm: json.loads((out / "build" / arm / "cache.json").read_text()) for arm in TARGETS if cached(arm)}
    lines = ["# Sparse teacher targets on the embedded task", "",
             f"`python scripts/sparse_study.py` ({len(seeds)} training seeds: {', '.join(map(str, seeds))}; "
             f"{seconds / 60:.0f} minutes on {os.cpu_count()} CPU cores, two runs at a time). Every arm: the embedded "
             "default (`method=kd`: half CE, forward KL at T = 2, 1000 steps), greedy evaluation on the 200 test "
             "prompts; calibration: `kdexp analyze calibration` on the test references (teacher-forced "
             "next-token predictions, 15 bins; ECE and MCE in points of probability, %); mean ± std over the "
             "training seeds. Every cache is built at T = 2 (the loss temperature) and serves the three seeds; "
             "build time: one cache at a time, the tiny teacher's forward on the 4000 training sequences.", "",
             "| teacher target | ROUGE-L | exact match | ECE | MCE | bytes / token | cache MB | build s |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, (label, _) in TARGETS.items():
        rs = results[arm]
        meta = metas.get(arm)
        size = (f"{meta['bytes_per_token']} | {meta['positions'] * meta['bytes_per_token'] / 1e6:.1f} | "
                f"{meta['seconds']:.0f}") if meta else "(the live teacher) | - | -"
        lines.append(f"| {label} | {Stat.of([r['rougeL'] for r in rs]).fmt(1)} | "
                     f"{Stat.of([r['exact_match'] for r in rs]).fmt(1)} | "
                     f"{Stat.of([c[arm]['ece'] for c in calib]).fmt(2)} | {Stat.of([c[arm]['mce'] for c in calib]).fmt(2)} | "
                     f"{size} |")
    teacher = calib[0]["teacher"]
    lines += ["", f"The teacher on the same references: ECE {teacher['ece']:.2f}, MCE {teacher['mce']:.2f}, "
              f"next-token accuracy {teacher['accuracy']:.1f} %."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sparse-study")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "SPARSE_TEACHER.md")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    start = time.time()
    builds, runs, analyses = jobs(args.out, args.seeds)
    failed = run_jobs(builds, 1)  # alone, so that the build times are the cache's own
    failed += run_jobs([*builds, *runs, *analyses], args.workers)
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed (logs in {args.out / 'logs'}): no report")
    args.report.write_text(report(args.out, args.seeds, time.time() - start))
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
