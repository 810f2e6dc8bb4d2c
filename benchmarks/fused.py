"""The loss side of a distillation step: plain, chunked and fused paths, peak memory and time.

    python benchmarks/fused.py                       # GPT-2 and Qwen2.5-0.5B shapes, 4096 positions
    python benchmarks/fused.py --shapes qwen --positions 8192 --loss jsd
    python benchmarks/fused.py --device cuda --dtype bfloat16      # a GPU, under bf16 autocast

What is measured is everything from the models' final hidden states on: the student's and the
teacher's LM heads, the objective ``0.5 CE + 0.5 divergence`` (kd at ``kd_weight=0.5``), and
its backward into the student's hidden states and head weight. The transformer layers below
are the same for every path, so leaving them out shows what the paths themselves cost:

* ``plain``: both ``[N, V]`` logits built, the divergence and CE on them;
* ``chunked``: the same logits, the divergence over ``loss.chunk_size=auto`` positions at a
  time (recomputed in backward), CE plain: what kdexp did before the fused path;
* ``fused``: ``Objective.fused`` (kdexp/losses/fused.py): no ``[N, V]`` tensor at all;
* ``sft`` and ``sft fused``: CE alone, plain and fused (the memory an SFT step spends on logits).

Each cell runs in a fresh process: inputs (hidden states, heads) allocated, one warm-up on 8
positions, then one forward + backward timed; peak memory is the rise of the RSS high-water
mark above the inputs (CPU) or ``torch.cuda.max_memory_allocated`` above them (GPU). The head
weights' gradient ([V, H] float32) is allocated by every path and counted.

Results: ``benchmarks/results/fused.json`` and ``fused.md`` (ratios fused / chunked, fused /
plain, and fused kd / sft, each from cells measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from procmem import read_peak, start_peak  # benchmarks/procmem.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"gpt2": (768, 50257), "qwen": (896, 151936), "tiny": (37, 1000)}  # hidden, vocabulary; tiny: tests
PATHS = ["plain", "chunked", "fused", "sft", "sft fused"]
SMALL_CHUNK = 64  # "fused c64": the fused path at loss.chunk_size=64, against its auto chunk (256 at V = 152k)
MIB = 1024**2


def measure(path: str, hidden: int, vocab: int, positions: int, loss: str, device: str, dtype: str) -> dict:
    """One forward + backward of the loss side in this (child) process."""
    import torch

    from kdexp.losses.fused import Head
    from kdexp.losses.objective import Objective

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    kd = path in ("plain", "chunked", "fused", "fused c64")
    spec = [{"loss": "ce", "weight": 0.5 if kd else 1.0}]
    if kd:
        chunk = {"chunked": "auto", "fused c64": SMALL_CHUNK}.get(path)
        spec.append({"loss": loss, "weight": 0.5, "chunk_size": chunk})
    objective = Objective.from_spec(spec)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def inputs(n: int):
        s_h = (torch.randn(n, 1, hidden, device=device)).requires_grad_()
        t_h = torch.randn(n, 1, hidden, device=device)
        targets = torch.randint(0, vocab, (n, 1), device=device)
        return s_h, t_h, {"targets": targets}

    s_w = (torch.randn(vocab, hidden, device=device) * hidden ** -0.5).requires_grad_()
    t_w = torch.randn(vocab, hidden, device=device) * hidden ** -0.5

    def step(s_h, t_h, batch, n):
        with autocast:
            student, teacher = Head(s_h, s_w), Head(t_h, t_w) if kd else None
            if "fused" in path:
                value, _ = objective.fused(student, teacher, batch, float(n))
            else:
                value, _ = objective(student.logits(), None if teacher is None else teacher.logits(), batch, float(n))
        value.backward()
        return value

    # one-off kernel and thread setup; on a GPU at full size (cuBLAS picks its kernels per shape)
    n = positions if device == "cuda" else 8
    step(*inputs(n), n)
    s_w.grad = None
    s_h, t_h, batch = inputs(positions)
    t_h = t_h.to(dt)
    base = start_peak(device)
    start = time.perf_counter()
    value = step(s_h, t_h, batch, positions)
    peak = read_peak(device)
    return {"extra": peak - base, "seconds": time.perf_counter() - start, "value": value.item()}


def run_child(args: argparse.Namespace, path: str, shape: str) -> dict:
    hidden, vocab = SHAPES[shape]
    cmd = [sys.executable, __file__, "--child", path, shape, "--positions", str(args.positions),
           "--loss", args.loss, "--device", args.device, "--dtype", args.dtype]
    env = {"THP_MEM_ALLOC_ENABLE": "1", **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    cell = {"path": path, "shape": shape, "hidden": hidden, "vocab": vocab, "positions": args.positions,
            "loss": args.loss}
    if proc.returncode != 0:
        return cell | {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return cell | json.loads(proc.stdout.strip().splitlines()[-1])


def report(cells: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# The loss side of a step: plain, chunked and fused ({args.device}, {args.dtype})", "",
             f"`python benchmarks/fused.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores. "
             f"{args.positions} target positions, 0.5 CE + 0.5 {args.loss}; memory is the peak above "
             "the inputs (hidden states and heads), the head's float32 gradient included.", "",
             "| shape | path | peak MiB | seconds | loss |", "|---|---|---|---|---|"]
    for c in cells:
        if c.get("error"):
            lines.append(f"| {c['shape']} (V={c['vocab']}) | {c['path']} | failed: {c['error'][:80]} | | |")
        else:
            lines.append(f"| {c['shape']} (V={c['vocab']}) | {c['path']} | {c['extra'] / MIB:,.0f} | "
                         f"{c['seconds']:.2f} | {c['value']:.5f} |")
    lines += ["", "| shape | fused / chunked memory | fused / chunked time | fused / plain memory | "
              "fused kd / sft (plain) memory | fused kd / sft fused memory |", "|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(c["shape"] for c in cells):
        got = {c["path"]: c for c in cells if c["shape"] == shape and not c.get("error")}
        if not {"fused", "chunked", "plain", "sft", "sft fused"} <= got.keys():
            continue
        f = got["fused"]
        lines.append(f"| {shape} | {f['extra'] / got['chunked']['extra']:.2f} | "
                     f"{f['seconds'] / got['chunked']['seconds']:.2f} | {f['extra'] / got['plain']['extra']:.2f} | "
                     f"{f['extra'] / got['sft']['extra']:.2f} | {f['extra'] / got['sft fused']['extra']:.2f} |")
    small = [(shape, c, f) for shape in dict.fromkeys(c["shape"] for c in cells)
             for c in cells if c["shape"] == shape and c["path"] == "fused c64" and not c.get("error")
             for f in cells if f["shape"] == shape and f["path"] == "fused" and not f.get("error")]
    if small:
        lines += ["", f"| shape | fused at chunk {SMALL_CHUNK} / auto chunk: memory | time |", "|---|---|---|"]
        lines += [f"| {shape} | {c['extra'] / f['extra']:.2f} | {c['seconds'] / f['seconds']:.2f} |"
                  for shape, c, f in small]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("PATH", "SHAPE"))
    p.add_argument("--shapes", nargs="+", default=["gpt2", "qwen"], choices=list(SHAPES))
    p.add_argument("--paths", nargs="+", default=PATHS, choices=[*PATHS, "fused c64"],
                   help=f"'fused c64': the fused path at loss.chunk_size={SMALL_CHUNK} (not run by default)")
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--loss", default="fkl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.child:
        path, shape = args.child
        print(json.dumps(measure(path, *SHAPES[shape], args.positions, args.loss, args.device, args.dtype)))
        return
    cells = []
    for shape in args.shapes:
        for path in args.paths:
            cells.append(run_child(args, path, shape))
            print(json.dumps(cells[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused.json").write_text(json.dumps(cells, indent=1) + "\n")
    text = report(cells, args)
    (args.out / "fused.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
