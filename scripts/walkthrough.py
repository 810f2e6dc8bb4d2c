"""Time the README's commands as a new user meets them: wall time, exit status, lines of output
that are not progress bars, and the longest silence (no byte of output, progress bars included).

    python scripts/walkthrough.py                  # every step, in a scratch directory (about 12 minutes)
    python scripts/walkthrough.py --only default hub --out walkthrough.md

Each step runs ``kdexp ...`` (or a shell line) as a subprocess with ``HF_HUB_OFFLINE`` unset
and no network, in one scratch directory, so later steps find what earlier ones wrote (the
default run, the teacher cache, ...). A line is a progress bar when it carries a tqdm rate or
bar (``it/s``, ``s/it``, ``step/s``, ``batch/s``, ``|███``); every other non-empty line counts.
The silence is measured from the start: the import of torch and transformers included.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRESS = re.compile(r"(it|step|batch|s)/s\]|s/(it|step|batch)\]|\|[█▏▎▍▌▋▊▉ ]*\||\d+%\|")
FAST = "train.max_steps=60 logger=none"
STEPS = [  # (name, command, expected exit status)
    ("default", "kdexp train hydra.run.dir=runs/default", 0),
    ("help", "kdexp train --help", 0),
    ("cfg", "kdexp train method=sft --cfg job", 0),
    ("typo", "kdexp train loss=fk1", 2),
    ("hub", "kdexp train student=gpt2 teacher=gpt2-xl", 2),
    ("dolly", "kdexp train data=dolly", 2),
    ("dolly-path", "kdexp train data=dolly data.path=databricks-dolly-15k.jsonl", 2),
    ("eval-missing", "kdexp eval runs/does_not_exist", 2),
    ("eval", "kdexp eval runs/default hydra.run.dir=runs/eval", 0),
    ("eval-model", "kdexp eval model=tiny eval.sets=[toy] eval=greedy hydra.run.dir=runs/eval-tiny", 0),
    ("cache", "kdexp cache-teacher teacher=tiny teacher.top_k=64", 0),
    ("kd-cache", f"kdexp train method=kd teacher.source=cache teacher.top_k=64 {FAST} hydra.run.dir=runs/kd-cache", 0),
    ("seqkd", f"kdexp train method=seqkd {FAST} hydra.run.dir=runs/seqkd", 0),
    ("distillm2", f"kdexp train method=distillm2 {FAST} hydra.run.dir=runs/distillm2", 0),
    ("sgo", f"kdexp train method=sgo {FAST} hydra.run.dir=runs/sgo", 0),
    ("sweep", f"kdexp train -m method=sft,kd seed=0,1 {FAST} hydra.sweep.dir=multirun/kd-vs-sft", 0),
    ("compare", "kdexp compare multirun/kd-vs-sft hydra.run.dir=runs/compare", 0),
    ("summarize", "python {root}/scripts/summarize.py multirun/kd-vs-sft", 0),
    ("analyze", "kdexp analyze exposure runs/seqkd runs/default analyze.labels=[seqkd,kd] analyze.max_samples=32", 0),
    # "killed at some point": SIGTERM after 12 s (the run checkpoints and stops; timeout's status 124)
    ("resume-1", "timeout -s TERM 12 kdexp train logger=none train.max_steps=2000 hydra.run.dir=runs/long", 124),
    ("resume-2", "kdexp train logger=none train.max_steps=2000 train.resume=true hydra.run.dir=runs/long", 0),
]


def run(command: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    last, silence, chunks, broken_by = start, 0.0, [], ""
    while True:
        sel.select(timeout=1.0)
        data = os.read(proc.stdout.fileno(), 65536)
        now = time.perf_counter()
        if not data:
            if proc.poll() is not None:
                break
            continue
        if now - last > silence:
            silence, broken_by = now - last, data.decode(errors="replace").strip()[:70]
        last = now
        chunks.append(data)
    proc.wait()
    text = b"".join(chunks).decode(errors="replace")
    pieces = [p.strip() for p in re.split(r"[\r\n]", text)]
    lines = [p for p in pieces if p and not PROGRESS.search(p)]
    return {"seconds": time.perf_counter() - start, "status": proc.returncode, "lines": len(lines),
            "bars": sum(1 for p in pieces if p and PROGRESS.search(p)) > 0, "silence": silence,
            "text": lines, "broken_by": broken_by}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="the steps to run (names: " + ", ".join(s for s, _, _ in STEPS) + ")")
    p.add_argument("--dir", type=Path, help="the scratch directory (default: a fresh temporary one)")
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--show", action="store_true", help="print each step's non-progress lines")
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    cwd = args.dir or Path(tempfile.mkdtemp(prefix="kdexp-walkthrough-"))
    cwd.mkdir(parents=True, exist_ok=True)
    rows = ["| step | command | exit (expected) | seconds | longest silence (s) | lines besides progress bars |",
            "|---|---|---|---|---|---|"]
    failed = False
    for name, command, expected in STEPS:
        if args.only and name not in args.only:
            continue
        command = command.format(root=root)
        got = run(command, cwd)
        failed |= got["status"] != expected
        rows.append(f"| {name} | `{command}` | {got['status']} ({expected}) | {got['seconds']:.1f} | "
                    f"{got['silence']:.1f} | {got['lines']} |")
        print(rows[-1], flush=True)
        if args.show:
            print(f"    (the longest silence ended with: {got['broken_by']!r})")
            print("\n".join(f"    {line}" for line in got["text"]), flush=True)
    table = "\n".join(rows) + "\n"
    print(f"\nin {cwd}\n\n{table}")
    if args.out:
        args.out.write_text(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
