"""Peak memory of a divergence's forward + backward: plain path vs chunked path.

    python benchmarks/loss_memory.py                       # V = 152064, B*T in {1024, 8192}
    python benchmarks/loss_memory.py --positions 1024 --losses fkl jsd akl --chunk 512

Each measurement runs in a fresh process: it allocates bf16 student and teacher logits
[positions, V] (as a bf16 model hands them over), reads its resident set size, runs the
divergence forward and backward (the student's gradient is allocated in both paths), and
reports the peak RSS above the inputs (VmHWM, reset after the inputs exist). On a GPU machine the same script
reports ``torch.cuda.max_memory_allocated`` instead (``--device cuda``). A measurement that
exceeds ``--limit-gib`` (an address-space limit on CPU) is reported as "over the limit"
instead of taking the machine down. Times are wall-clock seconds of one forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GIB = 1024**3


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(loss: str, positions: int, vocab: int, chunk: int | None, device: str, dtype: str) -> dict:
    """One forward + backward; returns peak bytes above the inputs and seconds. (Child process.)"""
    import time

    import torch

    from kdexp import losses

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    s = torch.empty(positions, vocab, dtype=dt, device=device).normal_(0, 2).requires_grad_(True)
    t = torch.empty(positions, vocab, dtype=dt, device=device).normal_(0, 2)
    fn = losses.divergence(loss, chunk_size=chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    start = time.perf_counter()
    fn(s, t).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM")
    seconds = time.perf_counter() - start
    return {"extra": peak - base, "grad": s.grad.numel() * s.grad.element_size(), "seconds": seconds}


def run_child(args: argparse.Namespace, loss: str, positions: int, chunk: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", loss, str(positions), str(chunk or 0),
           "--vocab", str(args.vocab), "--device", args.device, "--dtype", args.dtype,
           "--limit-gib", str(args.limit_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["fkl", "jsd"])
    parser.add_argument("--positions", nargs="+", type=int, default=[1024, 8192], help="B*T values")
    parser.add_argument("--vocab", type=int, default=152064, help="Qwen2.5's padded vocabulary")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--limit-gib", type=float, default=20.0)
    parser.add_argument("--child", nargs=3, metavar=("LOSS", "POSITIONS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.device == "cpu":
            import resource

            limit = int(args.limit_gib * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        loss, positions, chunk = args.child[0], int(args.child[1]), int(args.child[2]) or None
        print(json.dumps(measure(loss, positions, args.vocab, chunk, args.device, args.dtype)))
        return

    print(f"peak extra memory of forward + backward, {args.dtype} logits, V = {args.vocab}, "
          f"device {args.device}, chunk {args.chunk} (GiB; the student-logit gradient, allocated "
          f"by both paths, is included and shown apart)\n")
    print("| loss | B*T | inputs (2 tensors) | logit grad | plain: extra | chunked: extra | ratio | plain s | chunked s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loss in args.losses:
        for positions in args.positions:
            plain = run_child(args, loss, positions, None)
            chunked = run_child(args, loss, positions, args.chunk)
            bytes_per = 2 if args.dtype == "bfloat16" else 4
            inputs = 2 * positions * args.vocab * bytes_per / GIB

            def cell(r: dict, key: str, scale: float = GIB) -> str:
                if "error" in r:
                    return f"over {args.limit_gib:g} GiB" if key == "extra" else "-"
                return f"{r[key] / scale:.2f}"

            ratio = (f"{plain['extra'] / chunked['extra']:.1f}x" if "error" not in plain and "error" not in chunked
                     else "-")
            grad = next((r["grad"] / GIB for r in (plain, chunked) if "error" not in r), float("nan"))
            print(f"| {loss} | {positions} | {inputs:.2f} | {grad:.2f} | {cell(plain, 'extra')} | "
                  f"{cell(chunked, 'extra')} | {ratio} | {cell(plain, 'seconds', 1)} | {cell(chunked, 'seconds', 1)} |",
                  flush=True)
            for r, label in ((plain, "plain"), (chunked, "chunked")):
                if "error" in r and "memory" not in r["error"].lower():
                    print(f"  ({loss} {positions} {label}: {r['error']})", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
