"""Online speculative decoding on a drifting stream: a stale draft served static and updated
online, against a draft distilled offline on the whole task, 3 seeds.

    make osd-study                                 # docs/results/OSD.md and osd.png (about 13 minutes on 2 cores)
    python scripts/osd_study.py --seeds 0 --out runs/osd-quick --report /tmp/OSD.md

Per seed: two drafts are distilled from the tiny teacher with the embedded default's recipe
(``kdexp train``, 1000 steps, kd: forward KL at T = 2 with half CE): ``stale`` on four of the
eight families only (the world's lookups and sums: fact, describe, arith, category), ``offline``
on all eight. Then ``kdexp osd`` serves a stream of 600 test prompts (``data.toy.n_test=600``)
for the teacher: the first phase holds the stale draft's four families, the second the other
four (repeat, reverse, count, story: copying and sequence tasks), each in random order. Each
draft runs ``static`` and ``online`` (OSD's defaults: an update every 8 queries from the last 8
queries' rejected positions, forward KL, AdamW lr 1e-3), with gamma = 4 at temperature 1.
The seed sets the drafts' training, the stream's order and the sampler's random numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from reproduce import ROOT, Job, run_jobs

FIRST = ["fact", "describe", "arith", "category"]
SECOND = ["repeat", "reverse", "count", "story"]
COMMON = ["logger=none", "eval=greedy", "eval.teacher=false", "train.num_threads=1"]
DRAFTS = {"stale": [f"data.toy.families=[{','.join(FIRST)}]"], "offline": []}
STREAM = [f"osd.phases=[[{','.join(FIRST)}],[{','.join(SECOND)}]]", "data.toy.n_test=600", "data.toy.families=null",
          "logger=none"]


def jobs(out: Path, seeds: list[int]) -> list[Job]:
    out_jobs = []
    for seed in seeds:
        runs = []
        for name, overrides in DRAFTS.items():
            run = out / f"{name}-seed{seed}"
            runs.append(run)
            out_jobs.append(Job(["train", *overrides, *COMMON, f"seed={seed}", f"hydra.run.dir={run}"], run,
                                run / "results.json", 3.0, out / "logs" / f"{name}-seed{seed}.log"))
        run = out / f"osd-seed{seed}"
        out_jobs.append(Job(["osd", *map(str, runs), "osd.labels=[stale,offline]", *STREAM, f"seed={seed}",
                             f"osd.seed={seed}", f"hydra.run.dir={run}"], run, run / "osd.json", 6.0,
                            out / "logs" / f"osd-seed{seed}.log", tuple(r / "results.json" for r in runs)))
    return out_jobs


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean_se(series: list[list[float]]) -> tuple[list[float], list[float]]:
    """The pointwise mean and standard error over seeds, as far as every series reaches."""
    n = min(len(x) for x in series)
    mean = [statistics.mean(x[j] for x in series) for j in range(n)]
    se = [statistics.stdev(x[j] for x in series) / len(series) ** 0.5 if len(series) > 1 else 0.0 for j in range(n)]
    return mean, se


def load(out: Path, seeds: list[int]) -> list[dict]:
    return [json.loads((out / f"osd-seed{s}" / "osd.json").read_text()) for s in seeds]


ARMS = ["stale static", "stale online", "offline static", "offline online"]


def report(out: Path, seeds: list[int], figure: Path) -> str:
    records = load(out, seeds)
    window = int(records[0]["settings"]["window"])
    shift = records[0]["phase_starts"][0]
    lines = ["# Online speculative decoding on a drifting stream", "",
             f"`python scripts/osd_study.py` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; about 13 minutes on "
             f"{os.cpu_count()} CPU cores). {records[0]['queries']} queries; the shift after query {shift}. "
             "Mean ± std over the seeds. Acceptance: kept / verified draft tokens; tokens per call: response tokens "
             "per target forward pass (gamma = 4: at most 5); speed-up: tokens / (target calls + c x draft calls), "
             f"c = {records[0]['results']['stale static']['cost_ratio']:.3f} (the parameter counts' ratio).", "",
             "| draft | phase 1 acceptance | phase 2 acceptance | last window of phase 2 | tokens / call | speed-up |",
             "|---|---|---|---|---|---|"]
    last: dict[str, list[float]] = {}
    for arm in ARMS:
        rows = [r["results"][arm] for r in records]
        last[arm] = [r["windows"]["acceptance"][-1] for r in rows]
        lines.append(f"| {arm} | {mean_std([r['summary']['phase1_acceptance'] for r in rows])} | "
                     f"{mean_std([r['summary']['phase2_acceptance'] for r in rows])} | {mean_std(last[arm])} | "
                     f"{mean_std([r['summary']['tokens_per_call'] for r in rows], 2)} | "
                     f"{mean_std([r['summary']['speedup'] for r in rows], 2)} |")
    recovered = [(o - s) / (f - s) for o, s, f in zip(last["stale online"], last["stale static"],
                                                     last["offline static"], strict=True)]
    lines += ["", f"Recovered by the end of the stream (last window of {window} queries): (stale online - stale "
              f"static) / (offline static - stale static) = {mean_std(recovered, 2)}.", "",
              f"![acceptance per window of {window} queries, mean over the seeds](osd.png)", ""]
    curves(records, figure)
    return "\n".join(lines)


def curves(records: list[dict], path: Path) -> None:
    """The mean acceptance per window over the seeds, one line per arm, the shift marked."""
    from kdexp.evaluation import plots

    fig, axes = plots.figure(1, 1, width=6.5)
    for i, arm in enumerate(ARMS):
        runs = [r["results"][arm]["windows"] for r in records]
        mean, se = mean_se([w["acceptance"] for w in runs])
        plots.curve(axes[0], runs[0]["query"], mean, se, arm, plots.color(i // 2), "-" if "online" in arm else "--")
    axes[0].axvline(records[0]["phase_starts"][0], color="gray", lw=0.8, ls=":")
    axes[0].set_ylim(0, 1.02)
    plots.finish(axes[0], "acceptance per window (mean ± s.e. over seeds)", "queries served", "kept / verified")
    plots.save(fig, path, "Online speculative decoding: the stream shifts at the dotted line")


def main(doc: str = __doc__, make_jobs=jobs, make_report=report, name: str = "osd", report_name: str = "OSD.md") -> None:
    """A study's command line: run its jobs (finished ones are reused), then write its report and
    figure (``docs/results/REPORT_NAME`` and ``NAME.png`` by default)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / f"{name}-study")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / report_name)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    failed = run_jobs(make_jobs(args.out, args.seeds), args.workers)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (logs in {args.out / 'logs'}): no report")
    args.report.write_text(make_report(args.out, args.seeds, args.report.with_name(f"{name}.png")))
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
