"""A whole distillation step on randomly initialised models: plain, chunked and fused losses,
against the SFT step, peak memory and time.

    python benchmarks/fused_step.py --shapes gpt2                 # GPT-2 124M student, 355M teacher (CPU: ~6 min)
    python benchmarks/fused_step.py --shapes qwen --layers 2      # Qwen2.5-0.5B shapes, 2 layers each (CPU)
    python benchmarks/fused_step.py --device cuda --dtype bfloat16   # a GPU: both shapes, all their layers

One optimizer step: the student's forward and backward, the teacher's forward (no gradient),
the objective ``0.5 CE + 0.5 fkl`` (kd at ``kd_weight=0.5``) or CE alone (sft), and AdamW's
update, on ``--batch`` sequences of ``--length`` tokens, every position a target (4,096 by
default). The pieces are kdexp's own: ``Objective`` and ``Objective.fused``, the teachers'
``bare_heads`` / ``linear_head`` (kdexp/teachers/base.py). Paths:

* ``plain``: both models' ``[N, V]`` logits, the divergence on them (``loss.fused=false
  loss.chunk_size=null``); ``chunked``: the same logits, the divergence in chunks
  (``loss.fused=false``, the default before the fused path); ``fused``: ``loss.fused=auto``;
* ``sft``: CE on the student's logits; ``sft fused``: CE from its hidden states and head.

Every cell runs in a fresh process that holds both models (the sft cells too, so that their
peak is "the SFT step + the teacher's weights"), runs one warm-up step on 16 tokens (AdamW's
state then exists), and reports the peak of the timed step: the process's RSS high-water mark
(CPU) or ``torch.cuda.max_memory_allocated`` (GPU), everything included. The target of issue 25:
fused kd peak <= 1.15 x the sft peak (with the teacher's weights), and fused time <= 1.1 x the
chunked path's.

Results: ``benchmarks/results/fused_step.json`` and ``fused_step.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from procmem import read_peak, start_peak  # benchmarks/procmem.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PATHS = ["plain", "chunked", "fused", "sft", "sft fused"]
GIB = 1024**3


def models(shape: str, layers: int | None, device: str):
    """(student, teacher): GPT-2 small / medium, or two Qwen2.5-0.5B-shaped models."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run (a GPU initialises 0.5B in a moment)
        return _models(shape, layers)


def _models(shape: str, layers: int | None):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    if shape in ("gpt2", "tiny"):  # tiny: the tests' GPT-2 of the same kind (a 1000-token vocabulary)
        quiet = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        configs = ([GPT2Config(**quiet), GPT2Config(n_embd=1024, n_layer=24, n_head=16, **quiet)] if shape == "gpt2"
                   else [GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, **quiet),
                         GPT2Config(n_embd=96, n_layer=2, n_head=2, vocab_size=1000, **quiet)])
        configs = [c if layers is None else GPT2Config(**{**c.to_dict(), "n_layer": layers}) for c in configs]
        built = [GPT2LMHeadModel(c) for c in configs]
    else:
        qwen = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers or 24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
        built = [Qwen2ForCausalLM(Qwen2Config(**qwen)) for _ in range(2)]
    student, teacher = built
    return student.train(), teacher.eval().requires_grad_(False)


def measure(path: str, shape: str, args: argparse.Namespace) -> dict:
    import torch

    from kdexp.losses.fused import Head
    from kdexp.losses.objective import Objective
    from kdexp.teachers.base import bare_heads, linear_head

    device = args.device
    student, teacher = models(shape, args.layers, device)
    kd = path in ("plain", "chunked", "fused")
    spec = [{"loss": "ce", "weight": 0.5 if kd else 1.0}]
    if kd:
        spec.append({"loss": "fkl", "weight": 0.5, "chunk_size": None if path == "plain" else "auto"})
    objective = Objective.from_spec(spec)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    s_head, _ = linear_head(student)
    t_head, _ = linear_head(teacher)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    vocab = student.config.vocab_size

    def step(batch: int, length: int) -> float:
        ids = torch.randint(0, vocab, (batch, length), device=device)
        targets = torch.cat([ids[:, 1:], torch.full((batch, 1), -100, device=device)], 1)
        targets[:, -1] = ids[:, 0]  # every position a target
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with autocast:
            if path.endswith("fused"):
                with bare_heads(s_head):
                    hidden = student(**inputs).logits
                s = Head(hidden, s_head.weight, s_head.bias)
                t = None
                if kd:
                    with torch.no_grad(), bare_heads(t_head):
                        t = Head(teacher(**inputs).logits, t_head.weight, t_head.bias)
                loss, _ = objective.fused(s, t, {"targets": targets}, float(targets.numel()))
            else:
                s = student(**inputs).logits
                with torch.no_grad():
                    t = teacher(**inputs).logits if kd else None
                loss, _ = objective(s, t, {"targets": targets}, float(targets.numel()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step(1, 16)  # warm-up: AdamW's state, kernels, threads
    base = start_peak(device)
    value = step(args.batch, args.length)  # the first step at full size: its peak (the allocator grows here)
    peak = read_peak(device)
    times = []
    for _ in range(args.repeat):  # then its time: the median of steps that find kernels and memory ready
        start = time.perf_counter()
        step(args.batch, args.length)
        times.append(time.perf_counter() - start)
    return {"peak": peak, "before": base, "seconds": statistics.median(times), "value": value,
            "teacher_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters())}


def report(cells: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# A whole kd step: plain, chunked and fused losses against sft ({args.device}, {args.dtype})", "",
             f"`python benchmarks/fused_step.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores. "
             f"{args.batch} x {args.length} = {args.batch * args.length} target positions; layers: "
             f"{args.layers or 'all'}. Peak: the whole process during the timed step (both models, AdamW "
             "state and the step), so the sft rows are the SFT step plus the teacher's weights.", "",
             "| shape | path | peak GiB | before the step GiB | seconds | loss |", "|---|---|---|---|---|---|"]
    for c in cells:
        if c.get("error"):
            lines.append(f"| {c['shape']} | {c['path']} | failed: {c['error'][:80]} | | | |")
        else:
            lines.append(f"| {c['shape']} | {c['path']} | {c['peak'] / GIB:.2f} | {c['before'] / GIB:.2f} | "
                         f"{c['seconds']:.1f} | {c['value']:.4f} |")
    lines += ["", "| shape | fused kd / sft peak (target <= 1.15) | fused kd / sft fused peak | fused / chunked time "
              "(target <= 1.1) | fused / chunked peak | fused / plain peak |", "|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(c["shape"] for c in cells):
        got = {c["path"]: c for c in cells if c["shape"] == shape and not c.get("error")}
        if set(PATHS) <= got.keys():
            f = got["fused"]
            lines.append(f"| {shape} | {f['peak'] / got['sft']['peak']:.2f} | {f['peak'] / got['sft fused']['peak']:.2f} | "
                         f"{f['seconds'] / got['chunked']['seconds']:.2f} | {f['peak'] / got['chunked']['peak']:.2f} | "
                         f"{f['peak'] / got['plain']['peak']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("PATH", "SHAPE"))
    p.add_argument("--shapes", nargs="+", default=["gpt2", "qwen"], choices=["gpt2", "qwen", "tiny"])
    p.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    p.add_argument("--layers", type=int, default=None, help="layers per model (default: the real count)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3, help="timed steps after the first (their median is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="fused_step", help="results file name (without extension)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return
    cells = []
    for shape in args.shapes:
        for path in args.paths:
            cmd = [sys.executable, __file__, "--child", path, shape, "--batch", str(args.batch), "--length",
                   str(args.length), "--device", args.device, "--dtype", args.dtype, "--repeat", str(args.repeat),
                   *(["--layers", str(args.layers)] if args.layers else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={"THP_MEM_ALLOC_ENABLE": "1", **os.environ})
            cell = {"path": path, "shape": shape}
            if proc.returncode:
                cell["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            else:
                cell |= json.loads(proc.stdout.strip().splitlines()[-1])
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(cells, indent=1) + "\n")
    text = report(cells, args)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
