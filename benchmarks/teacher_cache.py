"""The teacher-logit cache against the live teacher: bytes per token, build time, training
speed and the final metric, at top-k 16, 64 and 256.

    python benchmarks/teacher_cache.py                         # the embedded kd run, 2 seeds (about 20 min on 2 cores)
    python benchmarks/teacher_cache.py --seeds 0 --ks 64 --steps 200

For every k, ``kdexp cache-teacher`` builds the cache of the toy training split; then the
embedded kd run (``kdexp train method=kd``: 0.5 CE + 0.5 T^2 forward KL at T = 2, or
``--loss``) trains once with the live teacher and once from each cache, with the same seeds.
Reported per k: bytes per token and size on disk, the build's seconds, the step time relative
to the live-teacher run, and ROUGE-L / exact match on the test split (mean over seeds, and the
difference to the live teacher). All in one invocation on one machine.

Results: ``benchmarks/results/teacher_cache.json`` and ``benchmarks/results/teacher_cache.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def kdexp(root: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "kdexp", *args]
    proc = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def step_seconds(run: Path) -> float:
    """Seconds per step over the logged steps after the first (warm-up excluded)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    return (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the embedded run's)")
    parser.add_argument("--loss", default="fkl")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every command")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    common = ["logger=none", f"loss={args.loss}", *args.extra]
    train = ["method=kd", "eval.teacher=false", "train.save_every=0", "train.eval_every=0",
             *([f"train.max_steps={args.steps}"] if args.steps else [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common.append(f"rollout.cache_dir={root / 'cache'}")
        caches = {}
        for k in args.ks:
            kdexp(root, "cache-teacher", *common, f"teacher.top_k={k}", f"hydra.run.dir={root / f'cache{k}'}")
            caches[k] = json.loads((root / f"cache{k}" / "cache.json").read_text())
            print(f"cache k={k}: {caches[k]['bytes_per_token']} bytes/token, {caches[k]['seconds']:.0f} s", flush=True)
        for label, source in [("live", []), *[(f"top-{k}", ["teacher.source=cache", f"teacher.top_k={k}"])
                                                for k in args.ks]]:
            per_seed = []
            for seed in args.seeds:
                run = root / f"{label}-{seed}"
                kdexp(root, "train", *common, *train, *source, f"seed={seed}", f"hydra.run.dir={run}")
                results = json.loads((run / "results.json").read_text())
                per_seed.append({"seed": seed, "rougeL": results["rougeL"], "exact_match": results["exact_match"],
                                 "step_s": step_seconds(run)})
                print(f"{label} seed {seed}: ROUGE-L {results['rougeL']:.2f}, "
                      f"{per_seed[-1]['step_s'] * 1000:.1f} ms/step", flush=True)
            row = {"teacher": label, "seeds": per_seed,
                   **{key: statistics.fmean(s[key] for s in per_seed) for key in ("rougeL", "exact_match", "step_s")}}
            if label != "live":
                meta = caches[int(label.split("-")[1])]
                row |= {"bytes_per_token": meta["bytes_per_token"], "cache_mb": meta["positions"] *
                        meta["bytes_per_token"] / 1e6, "build_s": meta["seconds"], "positions": meta["positions"]}
            rows.append(row)
    live = rows[0]
    for r in rows:
        r["rougeL_vs_live"] = r["rougeL"] - live["rougeL"]
        r["step_time_vs_live"] = r["step_s"] / live["step_s"]
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
              "target_bytes_per_token_at_64": 400}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teacher_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The teacher-logit cache vs the live teacher (tiny models, this machine, one run)", "",
             f"kd (`method=kd loss={args.loss}`), seeds {args.seeds}, the toy task; ROUGE-L and exact match on "
             "the test split, mean over seeds (per seed in the JSON); `python benchmarks/teacher_cache.py`.", "",
             "| teacher | bytes / token | cache MB | build s | ms / step | step time vs live | ROUGE-L | vs live "
             "| exact match |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = (f"{r['bytes_per_token']} | {r['cache_mb']:.1f} | {r['build_s']:.0f}" if "bytes_per_token" in r
                else "- | - | -")
        lines.append(f"| {r['teacher']} | {size} | {r['step_s'] * 1000:.1f} | {r['step_time_vs_live']:.2f} | "
                     f"{r['rougeL']:.2f} | {r['rougeL_vs_live']:+.2f} | {r['exact_match']:.2f} |")
    spread = [s["rougeL"] for s in live["seeds"]]
    lines += ["", f"Live-teacher ROUGE-L across seeds: {min(spread):.2f}-{max(spread):.2f} (the noise floor of "
              "the differences above)."]
    (args.out / "teacher_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
