"""Divergences: wall-clock time and peak memory of forward + backward, plain path vs chunked path.

    python benchmarks/divergences.py                  # the default grid: 14 min on 2 cores (23 when shared)
    python benchmarks/divergences.py --vocab 152064 --positions 1024 --losses fkl jsd akl --chunk 512
    python benchmarks/divergences.py --device cuda --large-losses all   # a GPU: every divergence everywhere

The grid is every divergence of ``kdexp.losses.names()`` x V in {32000, 152064} (Llama-2's and
Qwen2.5's padded vocabularies) x B*T in {1024, 8192} positions x {plain, chunked}. On 2 CPU
cores a 152k x 8k forward + backward of one divergence takes a minute or more, so by default
every divergence runs at the smallest B*T and only ``--large-losses`` (fkl, rkl, jsd, tvd and
skl: the KL pair, the mixture, the non-KL one and one of the skew family) at the larger B*T;
``--large-losses all`` runs the full grid.

Each measurement runs in a fresh process: it allocates bf16 student and teacher logits
[B*T, V] (as a bf16 model hands them over), runs one small warm-up, reads its resident set
size, runs the divergence forward and backward (the student's gradient is allocated in both
paths, and shown apart as "logit grad"), and reports the peak RSS above the inputs (VmHWM,
reset after the inputs exist). With ``--device cuda`` it reports
``torch.cuda.max_memory_allocated`` above the inputs instead. On CPU an address-space limit
(``--limit-gib``, default 80 % of the machine's memory) turns a plain path that does not fit
into "over the limit" instead of taking the machine down; the child then reports how much
address space was left above the inputs, a lower bound of what the plain path needed. Times
are wall-clock seconds of one forward + backward (timed once), with PyTorch's CPU allocations on
transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``; set it to 0 to compare). The chunked path is
``losses.divergence(name, chunk_size=--chunk)``; 256 positions by default (see ``CHUNK_WHY``).

Results: ``benchmarks/results/divergences.json`` (every cell) and ``divergences.md`` (a table
per vocabulary with the ratios chunked / plain, and the target: chunked peak memory <= 25 % of
the plain path's at the largest cell, V = 152k, B*T = 8k).
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

from procmem import read_peak, start_peak, status_bytes  # benchmarks/procmem.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 1024**3
TARGET = 0.25  # chunked peak memory / plain peak memory at the largest cell
LARGE_LOSSES = ["fkl", "rkl", "jsd", "tvd", "skl"]
CHUNK_WHY = ("a fixed number of positions, so the chunked path's working set (a few float32 [chunk, V] "
             "tensors: 149 MiB each at V = 152k) does not grow with B*T; 256 keeps it well under the "
             "student-logit gradient that both paths allocate (2.3 GiB at 152k x 8k) while the Python loop "
             "over chunks stays negligible (32 chunks at B*T = 8k)")
TILE = 1024  # rows of fresh normal samples; larger inputs repeat them (values change neither time nor memory)


def _logits(positions: int, vocab: int, dtype, device: str, seed: int):
    """[positions, V] logits ~ N(0, 2^2), fresh samples for the first TILE rows, repeated after."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    block = torch.randn(min(positions, TILE), vocab, generator=g).mul_(2).to(dtype=dtype, device=device)
    out = torch.empty(positions, vocab, dtype=dtype, device=device)
    for i in range(0, positions, TILE):
        out[i:i + TILE] = block[:positions - i]
    return out


def measure(loss: str, positions: int, vocab: int, chunk: int | None, device: str, dtype: str,
            limit: int | None) -> dict:
    """One forward + backward of ``loss`` in this (child) process: peak bytes above the inputs, seconds."""
    import torch

    from kdexp import losses

    dt = getattr(torch, dtype)
    fn = losses.divergence(loss, chunk_size=chunk)
    warm = torch.zeros(8, vocab, dtype=dt, device=device, requires_grad=True)
    fn(warm, torch.zeros(8, vocab, dtype=dt, device=device)).sum().backward()  # one-off kernel/thread setup
    del warm
    s = _logits(positions, vocab, dt, device, seed=0).requires_grad_(True)  # [B*T, V] student
    t = _logits(positions, vocab, dt, device, seed=1)  # [B*T, V] teacher
    base = start_peak(device)
    # CPU: the address space left above the inputs under the limit
    room = limit - status_bytes("VmSize") if device != "cuda" and limit else None
    start = time.perf_counter()
    try:
        value = fn(s, t).sum()  # [] float32
        value.backward()
    except (RuntimeError, MemoryError) as e:  # the address-space limit (CPU) or the GPU's memory
        if not ("memory" in str(e).lower() or isinstance(e, MemoryError)):
            raise
        return {"error": f"over the limit: {str(e).splitlines()[0][:200]}",
                "extra_more_than": room}
    peak = read_peak(device)
    seconds = time.perf_counter() - start
    return {"extra": peak - base, "grad": s.grad.numel() * s.grad.element_size(), "seconds": seconds,
            "value": value.item()}


def run_child(args: argparse.Namespace, loss: str, vocab: int, positions: int, chunk: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", loss, str(vocab), str(positions), str(chunk or 0),
           "--device", args.device, "--dtype", args.dtype, "--limit-gib", str(args.limit_gib)]
    # Transparent huge pages for PyTorch's CPU allocations: with 4 KiB pages the kernel's page
    # faults on fresh [chunk, V] buffers took more than half of the time; memory is the same.
    env = {"THP_MEM_ALLOC_ENABLE": "1", **os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    cell = {"loss": loss, "vocab": vocab, "positions": positions, "path": "chunked" if chunk else "plain",
            "chunk": chunk, "input_bytes": 2 * positions * vocab * (2 if args.dtype == "bfloat16" else 4)}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} ({tail})"
        return cell | {"error": tail}
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return cell | {"extra_bytes": got.get("extra"), "grad_bytes": got.get("grad"), "seconds": got.get("seconds"),
                   "value": got.get("value"), "error": got.get("error"), "extra_more_than": got.get("extra_more_than")}


def summarize(cells: list[dict]) -> list[dict]:
    """One row per (loss, V, B*T): the ratios chunked / plain of extra memory and time.

    Where the plain path was over the limit, ``memory_ratio_bound`` is chunked / (the room the
    plain path exceeded), an upper bound of the true ratio, and ``memory_ratio_estimate`` uses the
    plain path's extra memory extrapolated linearly in B*T from the largest B*T at which it ran
    (every tensor of the plain path is [B*T, V]).
    """
    by = {(c["loss"], c["vocab"], c["positions"], c["path"]): c for c in cells}
    rows = []
    for (loss, vocab, positions, path), chunked in by.items():
        if path != "chunked" or (loss, vocab, positions, "plain") not in by:
            continue
        plain = by[loss, vocab, positions, "plain"]
        row = {"loss": loss, "vocab": vocab, "positions": positions, "plain_extra_bytes": plain.get("extra_bytes"),
               "chunked_extra_bytes": chunked.get("extra_bytes"), "plain_seconds": plain.get("seconds"),
               "chunked_seconds": chunked.get("seconds"), "memory_ratio": None, "time_ratio": None,
               "plain_over_limit": bool(plain.get("error")) and plain.get("extra_more_than") is not None}
        ok = not plain.get("error") and not chunked.get("error")
        if ok:
            row["memory_ratio"] = chunked["extra_bytes"] / plain["extra_bytes"]
            row["time_ratio"] = chunked["seconds"] / plain["seconds"]
            row["value_rel_diff"] = abs(chunked["value"] - plain["value"]) / max(abs(plain["value"]), 1e-30)
        elif row["plain_over_limit"] and not chunked.get("error"):
            row["memory_ratio_bound"] = chunked["extra_bytes"] / plain["extra_more_than"]
            fits = [c for c in cells if c["loss"] == loss and c["vocab"] == vocab and c["path"] == "plain"
                    and not c.get("error") and c["positions"] < positions]
            if fits:
                ref = max(fits, key=lambda c: c["positions"])
                row["plain_extra_estimate_bytes"] = ref["extra_bytes"] * positions / ref["positions"]
                row["plain_estimate_from_positions"] = ref["positions"]
                row["memory_ratio_estimate"] = chunked["extra_bytes"] / row["plain_extra_estimate_bytes"]
        rows.append(row)
    return rows


def target_lines(rows: list[dict], limit_gib: float) -> tuple[dict, list[str]]:
    """Verdict on "chunked peak memory <= 25 % of plain" at the largest (V, B*T) measured.

    Per divergence: the measured ratio where both paths ran; where the plain path was over the
    limit, the upper bound (decides the target when it is below it) and the linear estimate
    (the best guess of the ratio, but not a measurement).
    """
    if not rows:
        return {}, []
    vocab = max(r["vocab"] for r in rows)
    positions = max(r["positions"] for r in rows if r["vocab"] == vocab)
    verdicts = {}
    lines = ["", f"## Target: chunked peak memory <= {TARGET:.0%} of plain at V = {vocab}, B*T = {positions}", ""]
    for r in (r for r in rows if r["vocab"] == vocab and r["positions"] == positions):
        measured, bound, estimate = r["memory_ratio"], r.get("memory_ratio_bound"), r.get("memory_ratio_estimate")
        if measured is not None:
            v = {"ratio": measured, "by": "measurement", "holds": measured <= TARGET}
            text = f"{measured:.1%} measured"
        elif bound is not None:
            text = f"< {bound:.1%} (upper bound: plain over the {limit_gib:g} GiB limit)"
            if estimate is not None:
                text = (f"{estimate:.1%} estimated (plain extrapolated from B*T = "
                        f"{r['plain_estimate_from_positions']}), {text}")
            if bound <= TARGET:
                v = {"ratio": estimate if estimate is not None else bound, "by": "bound", "holds": True}
            elif estimate is not None:
                v = {"ratio": estimate, "by": "estimate", "holds": estimate <= TARGET}
            else:  # a bound above the target decides nothing
                v = {"ratio": bound, "by": None, "holds": None}
            v["bound"] = bound
        else:
            v, text = {"ratio": None, "by": None, "holds": None}, "not measured (a path failed)"
        verdicts[r["loss"]] = v
        word = {True: "holds", False: "does NOT hold", None: "undecided"}[v["holds"]]
        lines.append(f"- {r['loss']}: {text}: **{word}**" + (f" (by the {v['by']})" if v["by"] else ""))
    decided = {k: v for k, v in verdicts.items() if v["holds"] is not None}
    summary = {"vocab": vocab, "positions": positions, "target": TARGET, "holds": None, "per_loss": verdicts}
    if decided:
        worst = max(decided, key=lambda k: decided[k]["ratio"])
        failed = [k for k, v in decided.items() if not v["holds"]]
        summary |= {"holds": not failed, "worst_loss": worst, "worst_ratio": decided[worst]["ratio"]}
        lines.append("")
        lines.append(f"**The target holds** for all of {', '.join(decided)}" if not failed
                     else f"**The target does NOT hold** for {', '.join(failed)}")
        for by in ("measurement", "bound", "estimate"):
            names = [k for k, v in decided.items() if v["by"] == by]
            if names:
                lines[-1] += f"; by the {by} for {', '.join(names)}"
        lines[-1] += (f". Worst ratio {decided[worst]['ratio']:.1%} ({worst}, "
                      f"{'measured' if decided[worst]['by'] == 'measurement' else 'estimated'})")
        bounds = {k: v["bound"] for k, v in verdicts.items() if "bound" in v}
        if bounds:
            top = max(bounds, key=bounds.get)
            summary |= {"worst_bound_loss": top, "worst_bound": bounds[top]}
            lines[-1] += f"; worst upper bound {bounds[top]:.1%} ({top})"
        lines[-1] += "."
        if len(decided) < len(verdicts):
            lines[-1] += f" Undecided: {', '.join(k for k in verdicts if k not in decided)}."
    return summary, lines


def markdown(result: dict) -> str:
    args, cells, rows = result["settings"], result["cells"], result["ratios"]
    by = {(c["loss"], c["vocab"], c["positions"], c["path"]): c for c in cells}

    def gib(x: float | None) -> str:
        return "-" if x is None else f"{x / GIB:.2f}"

    def mem(c: dict) -> str:
        if c.get("error"):
            return f"> {c['extra_more_than'] / GIB:.1f} (over limit)" if c.get("extra_more_than") else "failed"
        return gib(c["extra_bytes"])

    def sec(c: dict) -> str:
        return "-" if c.get("error") else f"{c['seconds']:.2f}"

    lines = [f"# Divergences: forward + backward, plain vs chunked ({args['device']}, this machine, one run)", "",
             f"{args['dtype']} logits [B*T, V] (student and teacher), {args['threads']} threads, chunked path "
             f"`chunk_size={args['chunk']}` positions ({CHUNK_WHY}). Memory: peak above the inputs, GiB "
             f"({'RSS high-water mark' if args['device'] == 'cpu' else 'max_memory_allocated'}); the student-logit "
             "gradient, allocated by both paths, is included and shown apart. Time: wall-clock seconds of one "
             "forward + backward" + (" (PyTorch's CPU allocator on transparent huge pages)"
                                     if args["device"] == "cpu" and args["thp_mem_alloc"] == "1" else "")
             + f". Ratios are chunked / plain. Address-space limit {args['limit_gib']:g} GiB. "
             f"`python benchmarks/divergences.py` (total {result['total_seconds'] / 60:.1f} min).", ""]
    for vocab in args["vocab"]:
        lines += [f"## V = {vocab}", "",
                  "| loss | B*T | inputs | logit grad | plain extra | chunked extra | memory ratio | plain s | "
                  "chunked s | time ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["vocab"] != vocab:
                continue
            plain, chunked = (by[r["loss"], vocab, r["positions"], p] for p in ("plain", "chunked"))
            grad = next((c["grad_bytes"] for c in (plain, chunked) if c.get("grad_bytes")), None)
            if r["memory_ratio"] is not None:
                mratio = f"{r['memory_ratio']:.1%}"
            elif "memory_ratio_bound" in r:
                mratio = f"< {r['memory_ratio_bound']:.1%}"
                if "memory_ratio_estimate" in r:
                    mratio += f" (est. {r['memory_ratio_estimate']:.1%})"
            else:
                mratio = "-"
            tratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
            lines.append(f"| {r['loss']} | {r['positions']} | {gib(plain['input_bytes'])} | {gib(grad)} | "
                         f"{mem(plain)} | {mem(chunked)} | {mratio} | {sec(plain)} | {sec(chunked)} | {tratio} |")
        lines.append("")
    skipped = result.get("skipped_at_large")
    if skipped:
        lines.append(f"Not run at B*T > {min(args['positions'])} (to keep the run affordable; `--large-losses all` "
                     f"runs them): {', '.join(skipped)}.")
    errors = [c for c in cells if c.get("error") and not c.get("extra_more_than")]
    for c in errors:
        lines.append(f"- {c['loss']} V={c['vocab']} B*T={c['positions']} {c['path']}: {c['error']}")
    work = {}
    for c in cells:
        if c["path"] == "chunked" and not c.get("error"):
            work.setdefault(c["vocab"], []).append((c["extra_bytes"] - c["grad_bytes"]) / GIB)
    if work:
        lines += ["", "The chunked path's working set (its extra memory minus the logit gradient) does not grow with "
                  "B*T: " + "; ".join(f"V = {v}: {min(w):.2f} to {max(w):.2f} GiB over the divergences and B*T"
                                      for v, w in work.items()) + "."]
    diffs = [r["value_rel_diff"] for r in rows if "value_rel_diff" in r]
    if diffs:
        lines += ["", f"Loss values, chunked vs plain: largest relative difference {max(diffs):.1e}."]
    if any("plain_extra_estimate_bytes" in r for r in rows):
        lines += ["", "Estimates (est.) extrapolate the plain path's extra memory linearly in B*T from the largest B*T "
                  "at which it fitted under the limit; the bound (<) divides by the room it exceeded instead."]
        lo, hi = min(args["positions"]), max(args["positions"])
        growth = [by[k[0], k[1], hi, "plain"]["extra_bytes"] / c["extra_bytes"] for k, c in
                  ((k, c) for k, c in by.items() if k[2] == lo and k[3] == "plain" and not c.get("error"))
                  if (k[0], k[1], hi, "plain") in by and not by[k[0], k[1], hi, "plain"].get("error") and hi > lo]
        if growth:
            lines[-1] += (f" Check where both fitted: plain extra at B*T = {hi} / at {lo} = {min(growth):.2f} to "
                          f"{max(growth):.2f} (linear: {hi / lo:g}).")
    lines += result["target_lines"]
    return "\n".join(lines) + "\n"


def main() -> None:
    from kdexp import losses

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=losses.names(), metavar="LOSS")
    parser.add_argument("--large-losses", nargs="+", default=LARGE_LOSSES, metavar="LOSS",
                        help="divergences also run at B*T above the smallest ('all': every one of --losses)")
    parser.add_argument("--vocab", nargs="+", type=int, default=[32000, 152064], help="vocabulary sizes V")
    parser.add_argument("--positions", nargs="+", type=int, default=[1024, 8192], help="B*T values")
    parser.add_argument("--chunk", type=int, default=256, help="positions per chunk of the chunked path")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit-gib", type=float, default=round(0.8 * os.sysconf("SC_PHYS_PAGES")
                                                                 * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
                        help="address-space limit of a CPU measurement (default: 80%% of this machine's memory)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=4, metavar=("LOSS", "V", "POSITIONS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        limit = None
        if args.device == "cpu":
            import resource

            limit = int(args.limit_gib * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        loss, vocab, positions, chunk = args.child[0], int(args.child[1]), int(args.child[2]), int(args.child[3])
        print(json.dumps(measure(loss, positions, vocab, chunk or None, args.device, args.dtype, limit)))
        return

    unknown = [n for n in args.losses + args.large_losses if n not in losses.names() and n != "all"]
    if unknown:
        parser.error(f"unknown losses {unknown}; choices: {', '.join(losses.names())}")
    large = set(args.losses) if "all" in args.large_losses else set(args.large_losses)
    smallest = min(args.positions)
    start = time.perf_counter()
    cells = []
    for vocab in args.vocab:
        for positions in sorted(args.positions):
            for loss in args.losses:
                if positions > smallest and loss not in large:
                    continue
                for chunk in (None, args.chunk):
                    cells.append(run_child(args, loss, vocab, positions, chunk))
                    c = cells[-1]
                    what = (c["error"] if c.get("error")
                            else f"{c['extra_bytes'] / GIB:6.2f} GiB {c['seconds']:7.2f} s")
                    print(f"V={vocab:<6} B*T={positions:<5} {loss:<5} {c['path']:<7} {what}", flush=True)
    rows = summarize(cells)
    target, lines = target_lines(rows, args.limit_gib)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "settings": vars(args) | {"out": str(args.out), "child": None,
                                        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")},
              "total_seconds": time.perf_counter() - start,
              "skipped_at_large": sorted(set(args.losses) - large) if len(args.positions) > 1 else [],
              "cells": cells, "ratios": rows, "target": target, "target_lines": lines}
    del result["settings"]["child"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "divergences.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "divergences.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
