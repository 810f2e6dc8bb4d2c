"""kd with a served teacher (``teacher.source=server``, ``kdexp serve-teacher``) against a live one.

    python benchmarks/served_teacher.py                 # tiny models, about 2 minutes on 2 cores
    python benchmarks/served_teacher.py --steps 30 --rounds 1 --top-k 16

On the same machine, in this one invocation: ``kdexp train method=kd`` with the teacher in the
process (``live``) and with the same teacher behind ``kdexp serve-teacher`` on localhost
(``server``, top-k log-probabilities per response token, the tail spread evenly), rounds
interleaved. Reported per side: seconds per optimizer step and the teacher's seconds per step
(``train/teacher_s``: the forward pass, or the HTTP round trip with the server's forward), read
from the loop's own log, the first logged steps dropped; and the ratio server / live. The
server runs on the same 2 cores here, so the ratio is the protocol's overhead plus a CPU shared
with the trainer, not what a teacher on its own GPU costs.

Results: ``benchmarks/results/served_teacher.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import step_time  # benchmarks/throughput.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    run = root / "serve"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("KDEXP_TEACHER_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "kdexp", "serve-teacher", "serve.port=0", f"hydra.run.dir={run}"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (run / "serve.json").is_file():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("kdexp serve-teacher did not start")
        time.sleep(0.2)
    return proc, json.loads((run / "serve.json").read_text())["url"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (the server takes the rest)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    from kdexp import api

    common = ["method=kd", "logger=none", f"train.max_steps={args.steps}", "train.log_every=1",
              "train.save_every=0", "train.eval_every=0", "eval.max_samples=2", "eval.seeds=[10]",
              "eval.teacher=false", f"train.num_threads={args.threads}", f"teacher.top_k={args.top_k}"]
    sides: dict[str, list[tuple[float, float, float]]] = {"live": [], "server": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, url = serve(root)
        try:
            for r in range(args.rounds):
                for side in sides:
                    run = root / f"{side}{r}"
                    extra = ["teacher.source=server", f"teacher.url={url}"] if side == "server" else []
                    api.run("train", [*common, *extra, f"hydra.run.dir={run}"], cwd=root)
                    sides[side].append(step_time(run, skip=3))
                    print(f"round {r}: {side} done", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    summary = {side: {"step_s": statistics.median(x[0] for x in runs), "teacher_s": statistics.median(x[2] for x in runs)}
               for side, runs in sides.items()}
    ratio = summary["server"]["step_s"] / summary["live"]["step_s"]
    result = {"settings": vars(args) | {"out": str(args.out)}, "sides": summary, "step_time_ratio": ratio,
              "cpus": os.cpu_count()}
    lines = ["# kd with a served teacher against a live one (tiny models, this machine)", "",
             f"`python benchmarks/served_teacher.py` - {args.steps} steps x {args.rounds} rounds per side, "
             f"top-{args.top_k}, trainer threads {args.threads}, server on the same {os.cpu_count()} CPUs.", "",
             "| teacher | ms / step | teacher ms / step |", "|---|---|---|"]
    lines += [f"| {side} | {s['step_s'] * 1e3:.1f} | {s['teacher_s'] * 1e3:.1f} |" for side, s in summary.items()]
    lines += ["", f"**server / live step time: {ratio:.2f}**"]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "served_teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "served_teacher.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
