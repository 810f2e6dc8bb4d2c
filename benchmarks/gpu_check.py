"""Everything a lent GPU should measure, in one call of under 9 minutes: ``make gpu-check``.

    python benchmarks/gpu_check.py                 # on a GPU: results in benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --smoke         # CPU, tiny settings: the test suite runs this so it cannot rot

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is
reported as such and the next one runs):

1. **every method** (and kd, gkd, okd under FSDP2, and kd of the bundled MoE student) for three bf16 optimizer steps on GPT-2 shapes (124M student, 355M
   teacher; ``benchmarks/trl_gkd.py``'s models), all at once (start-up is their cost, and the
   first H200 run fitted two of them one after the other), with the loss path each took;
2. **the loss side** at GPT-2 and Qwen2.5-0.5B shapes, 8,192 positions: plain, chunked and
   fused paths (``benchmarks/fused.py``), ``torch.cuda.max_memory_allocated``;
3. **a whole kd step** at both shapes, every layer (``benchmarks/fused_step.py``);
4. **TRL's GKDTrainer and DistillationTrainer against kdexp** at GPT-2 shapes
   (``benchmarks/trl_gkd.py``, ``--trainer gkd`` and ``distillation``);
5. **rollout tokens/s** and step times of sft and kd (``benchmarks/throughput.py``);
6. **where on-policy time goes**: kdexp's sampler against ``model.generate``, and its profile
   (``benchmarks/sampler_profile.py``);
7. **online speculative decoding** (``kdexp osd`` on the tiny models, static and online);
8. **vLLM rollouts against the HF sampler**: tokens/s at batch 1, 8 and 32, and gkd's loss curve
   with ``rollout.engine=vllm`` against ``hf`` (``benchmarks/vllm_rollouts.py``; "not available"
   where vLLM is not installed);
9. **Liger-Kernel's fused linear JSD** against kdexp's fused jsd at the same shapes, where
   ``liger_kernel`` imports (it is not a dependency; nothing is installed here).

``--smoke`` runs the same steps on CPU with tiny models and sizes. The report names the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
METHODS = ["sft", "kd", "seqkd", "gkd", "imitkd", "distillm", "sgo", "minillm", "distillm2", "taid", "gkd_rl", "okd",
           # FSDP2 on one GPU (NCCL): sharding, gathered generation and the gathered checkpoint
           "kd fsdp=full_shard", "gkd fsdp=full_shard", "okd fsdp=shard_grad_op",
           # a mixture-of-experts student (the bundled tiny one, with the tiny teacher): its load-balancing term
           "kd student=tiny-moe"]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 1024**3:.0f} GiB), torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def run(name: str, cmd: list[str], limit: float, cwd: Path) -> dict:
    start = time.perf_counter()
    try:
        path = os.pathsep.join(p for p in (str(BENCH), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"})
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
            "tail": out.strip().splitlines()[-3:]}


def method_runs(args: argparse.Namespace, work: Path, deadline: float) -> list[dict]:
    sys.path.insert(0, str(BENCH))
    from trl_gkd import gpt2_models

    common = ["logger=none", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4",
              "train.save_every=0", "train.eval_every=0", "eval.max_samples=8", "eval.seeds=[10]",
              "eval.teacher=false", "eval.max_new_tokens=16", "rollout.max_new_tokens=16", "data.toy.n_train=256"]
    if args.smoke:
        common += ["train.mixed_precision=no"]
    else:
        models = gpt2_models(work / "gpt2")
        common += ["train.mixed_precision=bf16", f"student.name_or_path={models / 'student'}", "student.init=random",
                   f"teacher.name_or_path={models / 'teacher'}", "teacher.init=pretrained"]
    # smoke: a fused and a plain-path method (the MoE student trains in tests/smoke/test_moe_osd.py)
    methods = METHODS if not args.smoke else ["kd", "minillm"]
    # On a GPU every method runs at once (16 cores, 140 GiB: start-up, not the GPU, is the cost);
    # on CPU one after the other. What is checked is that each runs and which loss path it took.
    width = len(methods) if not args.smoke else 1
    rows: list[dict] = []
    for i in range(0, len(methods), width):
        left = deadline - time.perf_counter()
        batch = methods[i:i + width]
        if left < 20:
            rows += [{"step": f"method={m}", "status": "skipped (time)", "seconds": 0, "tail": []} for m in batch]
            continue
        limit = min(150, left)

        def folder(m: str) -> Path:  # "kd fsdp=full_shard" -> run-kd_fsdp-full_shard ('=' breaks an override)
            return work / f"run-{m.replace(' ', '_').replace('=', '-')}"

        def one(m: str, limit: float = limit) -> dict:
            method, *engine = m.split()
            own = [a for a in common if not (any(e.startswith("student=") for e in engine)
                                              and a.startswith(("student.", "teacher.")))]  # its own models
            return run(f"method={m}", [sys.executable, "-m", "kdexp", "train", f"method={method}", *engine, *own,
                                       f"hydra.run.dir={folder(m)}"], limit, work)

        with ThreadPoolExecutor(len(batch)) as pool:
            got = list(pool.map(one, batch))
        for m, row in zip(batch, got, strict=True):
            log = folder(m) / "train.log"
            lines = log.read_text().splitlines() if log.is_file() else []
            row["loss path"] = next((line.split("loss: ", 1)[1] for line in lines if "loss: " in line), "?")
            rows.append(row)
    return rows


def liger(args: argparse.Namespace) -> dict:
    """Liger-Kernel's fused linear JSD against kdexp's fused jsd, where it imports."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure: not installed, no triton, no GPU)
        return {"step": "liger", "status": f"not available ({type(e).__name__})", "seconds": 0, "tail": []}
    import torch

    from kdexp.losses.fused import Head
    from kdexp.losses.objective import Objective

    n, h, v = (8192, 896, 151936) if not args.smoke else (64, 32, 500)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"step": "liger", "status": 0, "tail": []}
    for side in ("liger", "kdexp"):
        torch.manual_seed(0)
        s_h = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
        t_h = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
        s_w = (torch.randn(v, h, device=dev) * h ** -0.5).to(torch.bfloat16).requires_grad_()
        t_w = (torch.randn(v, h, device=dev) * h ** -0.5).to(torch.bfloat16)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if side == "liger":
            loss = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)(s_h, s_w, t_h, t_w, None)
        else:
            objective = Objective.from_spec([{"loss": "jsd", "weight": 1.0, "beta": 0.5}])
            loss, _ = objective.fused(Head(s_h[:, None], s_w), Head(t_h[:, None], t_w),
                                      {"targets": torch.zeros(n, 1, dtype=torch.long, device=dev)}, float(n))
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        out[side] = {"seconds": time.perf_counter() - start, "loss": float(loss),
                     "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if dev == "cuda" else None}
    out["seconds"] = round(out["liger"]["seconds"] + out["kdexp"]["seconds"], 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny settings (the test suite)")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for everything")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--skip", nargs="*", default=[], help="steps to leave out: methods, fused, step, throughput, sampler, osd, vllm, trl, distillation, liger")
    args = p.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    dev = ["--device", "cpu"] if args.smoke else ["--device", "cuda", "--dtype", "bfloat16"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kdexp-gpu-check-") as tmp:
        work = Path(tmp)
        # The benchmarks write into one folder, bundled into gpu_check.md / .json after every step:
        # two files come back from a GPU machine whatever it ran.
        details = work / "details"
        details.mkdir()
        if "methods" not in args.skip:
            rows += method_runs(args, work, start + args.budget * 0.35)
            write(rows, args, start, details)
        benches = [
            ("loss side (benchmarks/fused.py)", [py, str(BENCH / "fused.py"), *dev, "--out", str(details),
             "--paths", "plain", "chunked", "fused", *([] if args.smoke else ["fused c64"]), "sft", "sft fused",
             *(["--shapes", "tiny", "--positions", "300"] if args.smoke else ["--positions", "8192"])], 90),
            ("whole step (benchmarks/fused_step.py)", [py, str(BENCH / "fused_step.py"), *dev, "--out", str(details),
             *(["--shapes", "tiny", "--batch", "1", "--length", "32", "--paths", "fused", "sft"]
               if args.smoke else [])], 200),
            ("rollouts and step times (benchmarks/throughput.py)", [py, str(BENCH / "throughput.py"), "--out", str(details),
             "--rounds", "1", "--methods", "sft", "kd", *(["--steps", "15", "--batch", "4", "--new-tokens", "8"]
                                                         if args.smoke else ["--shape", "gpt2", "--steps", "20"])], 90),
            ("where sampling time goes (benchmarks/sampler_profile.py)",
             [py, str(BENCH / "sampler_profile.py"), "--out", str(details),
              *(["--smoke"] if args.smoke else ["--repeat", "3"])], 90),
            ("online speculative decoding (kdexp osd)",
             [py, "-m", "kdexp", "osd", "logger=none", f"hydra.run.dir={work / 'osd'}",
              *(["osd.max_queries=4", "osd.max_new_tokens=8", "osd.update_every=2", "osd.buffer_size=2"]
                if args.smoke else ["osd.max_queries=64"])], 90),
            ("vLLM rollouts vs the HF sampler (benchmarks/vllm_rollouts.py)",
             [py, str(BENCH / "vllm_rollouts.py"), "--out", str(details)], 150),
            ("TRL GKDTrainer vs kdexp (benchmarks/trl_gkd.py)", [py, str(BENCH / "trl_gkd.py"), "--out", str(details),
             *(["--steps", "10", "--warmup", "2", "--rounds", "1", "--batch", "4", "--new-tokens", "8"] if args.smoke
               else ["--device", "cuda", "--shape", "gpt2", "--steps", "12", "--rounds", "1"])], 120),
            ("TRL DistillationTrainer vs kdexp (benchmarks/trl_gkd.py --trainer distillation)",
             [py, str(BENCH / "trl_gkd.py"), "--trainer", "distillation", "--out", str(details),
              *(["--steps", "6", "--warmup", "2", "--rounds", "1", "--batch", "4", "--new-tokens", "8"] if args.smoke
                else ["--device", "cuda", "--shape", "gpt2", "--steps", "8", "--rounds", "1"])], 100),
        ]
        keys = ["fused", "step", "throughput", "sampler", "osd", "vllm", "trl", "distillation"]
        for key, (name, cmd, limit) in zip(keys, benches, strict=True):
            if key in args.skip:
                continue
            left = deadline - time.perf_counter()
            row = run(name, cmd, min(limit, left), ROOT) if left > 10 else {"step": name, "seconds": 0, "tail": []}
            if left <= 10 or (row["status"] == "timeout" and left < limit):  # the budget ran out, not the step
                row["status"] = "skipped (time)"
            report = details / "vllm_rollouts.json"
            if key == "vllm" and row["status"] == 0 and report.exists():  # "not available: ..." without vLLM
                row["status"] = json.loads(report.read_text())["status"]
            rows.append(row)
            write(rows, args, start, details)
        if "liger" not in args.skip:
            try:
                rows.append(liger(args))
            except Exception as e:  # noqa: BLE001 (an API change of a package we do not depend on)
                rows.append({"step": "liger", "status": f"failed: {type(e).__name__}: {e}"[:200], "seconds": 0,
                             "tail": []})
        write(rows, args, start, details)
    sys.exit(0 if all(r["status"] in (0, "skipped (time)") or str(r["status"]).startswith("not available")
                      for r in rows) else 1)


def write(rows: list[dict], args: argparse.Namespace, start: float, details: Path) -> dict:
    """gpu_check.json and .md as they stand (after every step: a run cut short keeps its results),
    with every benchmark's own report from ``details`` appended."""
    result = {"device": device_name(), "smoke": args.smoke, "seconds": round(time.perf_counter() - start, 1),
              "steps": rows,
              "details": {f.stem: json.loads(f.read_text()) for f in sorted(details.glob("*.json"))}}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# gpu-check on {result['device']}", "", f"{result['seconds']} s in all"
             + (" (--smoke: CPU, tiny settings)" if args.smoke else ""), "",
             "| step | status | seconds | loss path / last line |", "|---|---|---|---|"]
    for r in rows:
        last = r.get("loss path") or (r["tail"][-1][:100] if r.get("tail") else "")
        if r["step"] == "liger" and "kdexp" in r:
            last = json.dumps({k: r[k] for k in ("liger", "kdexp")})
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {last.replace('|', '/')} |")
    for report in sorted(details.glob("*.md")):
        lines += ["", "---", "", f"<!-- {report.name} -->", report.read_text().strip()]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
