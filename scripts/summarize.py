"""Mean and std over seeds of the final test scores of a set of runs, grouped by their config.

    python scripts/summarize.py runs/kd-vs-sft            # every */results.json below the folder
    python scripts/summarize.py runs/kd-vs-sft --by method.name loss.name

Without ``--by``, runs are grouped by every parameter that differs between them, the seed
apart (as ``kdexp compare`` finds them), so runs that differ in a swept value never merge.
    python scripts/summarize.py multirun/methods-a multirun/methods-b --relative-to kd
    python scripts/summarize.py multirun/methods-a multirun/okd --by method.name method.lmbda --relative-to kd

A run's score is its results.json ``rougeL`` / ``exact_match`` (already a mean over the eval
seeds); the table gives the mean and sample std of those over the runs of a group (the training
seeds).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from kdexp import compare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+")
    parser.add_argument("--by", nargs="+", default=None,
                        help="config keys to group by (default: every parameter that differs, the seed apart)")
    parser.add_argument("--relative-to", default=None,
                        help="also give each group's mean train time relative to the group whose "
                             "first --by value is this")
    args = parser.parse_args(argv)
    found = sorted(p for root in args.roots for p in root.rglob("results.json"))
    runs = [compare.load_run(p.parent) for p in found]
    if args.by is None:
        swept, from_overrides = compare.swept_params(runs)
        args.by = swept or ["method.name"]

        def value(run: compare.Run, k: str) -> str:
            return compare.value(run, k, from_overrides)
    else:
        def value(run: compare.Run, k: str) -> str:
            return str(OmegaConf.select(run.cfg, k))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        key = tuple(value(run, k) for k in args.by)
        groups[key].append({**run.results, "seed": run.cfg.seed})
    base = None
    if args.relative_to is not None:
        refs = [runs for key, runs in groups.items() if key[0] == args.relative_to]
        if len(refs) != 1:
            raise SystemExit(f"--relative-to {args.relative_to}: needs exactly one group whose first key "
                             f"is that, among {sorted(groups)}")
        base = statistics.fmean(r["train"]["time_s"] for r in refs[0])
    extra = " relative time |" if base else ""
    print(f"| {' | '.join(args.by)} | runs | seeds | ROUGE-L | exact match | train time (s) |{extra}")
    print("|" + "---|" * (len(args.by) + 5 + bool(base)))
    for key, runs in sorted(groups.items()):
        cells = []
        for metric in ("rougeL", "exact_match"):
            values = [r[metric] for r in runs]
            mean = statistics.fmean(values)  # one run: no spread to show
            cells.append(f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}")
        time_s = statistics.fmean(r["train"]["time_s"] for r in runs)
        seeds = ",".join(str(r["seed"]) for r in runs)
        rel = f" {time_s / base:.2f} |" if base else ""
        print(f"| {' | '.join(key)} | {len(runs)} | {seeds} | {cells[0]} | {cells[1]} | {time_s:.1f} |{rel}")


if __name__ == "__main__":
    main()
