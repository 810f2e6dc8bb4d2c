"""Training-step throughput of every method, the kd overhead ratio, and rollout speed.

    python benchmarks/throughput.py                     # tiny models, about 5 minutes on 2 cores (3 rounds)
    python benchmarks/throughput.py --steps 60 --methods sft kd
    python benchmarks/throughput.py --shape gpt2 --steps 8 --batch 8 --rounds 1 --methods sft kd "kd (teacher cache)"

Everything is measured in this one invocation on this machine, and reported as ratios:

* **Step time per method** (sft, kd, gkd with lmbda 0.5 and 1, okd, minillm): the real loop
  (``kdexp train``, logging off, no validation, no checkpoint before the end) on the bundled
  models, the same batch and lengths for every method. The time of a step is read from the
  run's ``metrics.jsonl`` (``time`` at the last logged step minus at the first, over the steps
  between), so model loading and the final evaluation are not counted. Tokens/s are the
  loop's own ``train/tokens_per_s``.
* **The kd overhead** (issue 8, point 4): kd step time / (sft step time + one teacher forward
  of a step's batch). A token-level KD step cannot cost less than a supervised step plus the
  teacher's forward pass, so 1.0 is the floor; the teacher forward's time is the loop's own
  measurement inside the kd run (``train/teacher_s``, synchronized on GPUs).
* **kd from the teacher cache** (point "teacher-logit cache"): ``teacher.source=cache`` with
  top-64 log-probabilities built by ``kdexp cache-teacher`` before the rounds (not timed);
  its throughput relative to sft (target >= 0.9).
* **GPT-2 shapes** (``--shape gpt2``): the same loop on randomly initialized GPT-2 small /
  medium shapes (124M student, 355M teacher, 50257 logits), results in ``throughput_gpt2.*``.
* **Rollout speed**: new tokens per second of the training rollout sampler
  (:func:`kdexp.rollout.sample`, KV cache, stop at EOS) at batch sizes 1, 8 and 32.

Results: ``benchmarks/results/throughput.json`` and ``benchmarks/results/throughput.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CACHE_TOP_K = 64
METHODS = {
    "sft": ["method=sft"],
    "kd": ["method=kd"],
    "gkd (lmbda 0.5)": ["method=gkd", "method.lmbda=0.5"],
    "gkd (lmbda 1)": ["method=gkd", "method.lmbda=1"],
    "okd": ["method=okd"],
    "minillm": ["method=minillm", "method.num_rollouts=16"],
    "kd (teacher cache)": ["method=kd", "teacher.source=cache", f"teacher.top_k={CACHE_TOP_K}"],
}
# GPT-2-shaped randomly initialized models (issue 8, point 2): GPT-2 small (124M) as the
# student, GPT-2 medium (355M) as the teacher, GPT-2's vocabulary size (50257 logits), with the
# bundled tokenizer (its 1024 ids are valid GPT-2 ids: the logits are GPT-2-sized).
GPT2 = {"student": {}, "teacher": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}


def gpt2_models(root: Path) -> list[str]:
    """Config-only GPT-2 directories (weights drawn at load time, ``init=random``) and their
    overrides."""
    from transformers import AutoTokenizer, GPT2Config

    from kdexp.models import asset_path

    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-student"))
    overrides = []
    for role, shape in GPT2.items():
        path = root / f"gpt2-{role}"
        GPT2Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
        tokenizer.save_pretrained(path)
        overrides += [f"{role}.name_or_path={path}", f"{role}.init=random"]
    return overrides


def common(args: argparse.Namespace) -> list[str]:
    return [*args.models, f"rollout.cache_dir={args.cache_dir}", "logger=none", f"train.max_steps={args.steps}", "train.log_every=5", "train.save_every=0",
            "train.eval_every=0", "eval.max_samples=4", "eval.seeds=[10]", "eval.teacher=false",
            f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            f"rollout.max_new_tokens={args.new_tokens}", f"train.num_threads={args.threads}",
            "train.warmup_steps=5",
            # one epoch's worth of training text: what the steps read (and the teacher cache holds)
            f"data.toy.n_train={args.steps * args.batch}"]


def step_time(run: Path, skip: int) -> tuple[float, float, float]:
    """Seconds per optimizer step, tokens/s and the teacher forward's seconds per step, from
    the loop's own log (first ``skip`` logged intervals dropped: warm-up of allocators and
    caches)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r][skip:]
    if len(rows) < 2:
        raise RuntimeError(f"{run}: not enough logged steps to time (raise --steps)")
    steps = rows[-1]["step"] - rows[0]["step"]
    seconds = (rows[-1]["time"] - rows[0]["time"]) / steps
    # train/teacher_s is a running mean from the first step: the teacher's seconds in the window
    teacher = (rows[-1]["train/teacher_s"] * rows[-1]["step"] - rows[0]["train/teacher_s"] * rows[0]["step"]) / steps
    return seconds, statistics.fmean(r["train/tokens_per_s"] for r in rows[1:]), teacher


def train(name: str, overrides: list[str], args: argparse.Namespace, root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    run = root / name.replace(" ", "_").replace("(", "").replace(")", "")
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "kdexp", "train", *common(args), *overrides, f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    seconds, tokens, teacher = step_time(run, skip=1)
    return {"method": name, "step_s": seconds, "tokens_per_s": tokens, "teacher_forward_s": teacher}


def cache_teacher(args: argparse.Namespace, root: Path) -> None:
    """The teacher cache of the training split (not timed: built once, used by every round)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "kdexp", "cache-teacher", *common(args), f"teacher.top_k={CACHE_TOP_K}",
           f"hydra.run.dir={root / 'cache-teacher'}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def rollout_speed(args: argparse.Namespace) -> list[dict]:
    """New tokens per second of the rollout sampler at several batch sizes (the student)."""
    import torch
    from hydra import compose, initialize_config_dir

    from kdexp.config import conf_dir, register_resolvers
    from kdexp.data import load_examples
    from kdexp.models import load_model
    from kdexp.rollout import RolloutSpec, sample

    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="bench"):
        cfg = compose("config", overrides=common(args))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(cfg.teacher, "teacher")  # a trained model: realistic stop lengths
    model.eval()
    prompts = [e.prompt_ids for e in load_examples(cfg.data, tok, ["test"])["test"]]
    spec = RolloutSpec(do_sample=True, max_new_tokens=args.new_tokens)
    out = []
    for size in (1, 8, 32):
        g = torch.Generator().manual_seed(0)
        tokens, seconds = 0, 0.0
        for start in range(0, min(len(prompts), max(size * 4, 32)), size):
            t0 = time.perf_counter()
            drawn = sample(model, prompts[start:start + size], spec, tok.eos_token_id, tok.pad_token_id, g)
            seconds += time.perf_counter() - t0
            tokens += sum(len(s.response_ids) for s in drawn)
        out.append({"batch": size, "tokens_per_s": tokens / seconds, "tokens": tokens})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
    parser.add_argument("--new-tokens", type=int, default=48, help="rollout length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every method (medians reported)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--shape", choices=["tiny", "gpt2"], default="tiny",
                        help="the bundled tiny models, or GPT-2-shaped random ones (124M / 355M)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    stem = "throughput" if args.shape == "tiny" else f"throughput_{args.shape}"

    # Rounds over the methods, interleaved, so that a slow spell of a shared machine hits
    # every method alike; each number is the median over the rounds (min and max kept).
    runs: dict[str, list[dict]] = {name: [] for name in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        args.models = gpt2_models(Path(tmp)) if args.shape == "gpt2" else []
        args.cache_dir = Path(tmp) / "cache"
        if any("teacher.source=cache" in METHODS[name] for name in args.methods):
            cache_teacher(args, Path(tmp))
        for r in range(args.rounds):
            for name in args.methods:
                runs[name].append(train(name, METHODS[name], args, Path(tmp) / f"round{r}"))
                print(f"round {r}: {name:<16} {runs[name][-1]['step_s'] * 1000:8.1f} ms/step", flush=True)
    rows = []
    for name, samples in runs.items():
        steps = [x["step_s"] for x in samples]
        rows.append({"method": name, "step_s": statistics.median(steps), "step_s_min": min(steps),
                     "step_s_max": max(steps),
                     "tokens_per_s": statistics.median(x["tokens_per_s"] for x in samples),
                     "teacher_forward_s": statistics.median(x["teacher_forward_s"] for x in samples)})
    by = {r["method"]: r for r in rows}
    sft = by.get("sft", {}).get("step_s")
    for r in rows:
        r["vs_sft"] = r["step_s"] / sft if sft else None
    result: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "threads": args.threads}, "settings": {k: v for k, v in vars(args).items() if k not in ("models", "cache_dir")} | {"out": str(args.out)},
                    "methods": rows}
    if "kd" in by and sft:
        teacher_s = by["kd"]["teacher_forward_s"]
        result["kd_overhead"] = {"kd_step_s": by["kd"]["step_s"], "sft_step_s": sft, "teacher_forward_s": teacher_s,
                                 "ratio": by["kd"]["step_s"] / (sft + teacher_s), "target": 1.10}
    cached = by.get("kd (teacher cache)")
    if cached and sft:
        result["kd_cache_vs_sft"] = {"kd_cache_step_s": cached["step_s"], "sft_step_s": sft,
                                     "throughput_ratio": sft / cached["step_s"], "target": 0.9}
    result["rollout"] = rollout_speed(args) if args.shape == "tiny" else []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    models = ("tiny models" if args.shape == "tiny" else
              "GPT-2-shaped random models: 124M student, 355M teacher, 50257 logits")
    lines = [f"# Training throughput ({models}, this machine, one run)", "",
             f"{args.batch} sequences per step, rollouts of up to {args.new_tokens} tokens, "
             f"{args.threads} threads, median of {args.rounds} interleaved runs (min-max); "
             "`python benchmarks/throughput.py`.", "",
             "| method | ms / step | tokens / s | step time vs sft |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['step_s'] * 1000:.1f} ({r['step_s_min'] * 1000:.1f}-{r['step_s_max'] * 1000:.1f}) "
              f"| {r['tokens_per_s']:.0f} | " + (f"{r['vs_sft']:.2f} |" if r["vs_sft"] else "|") for r in rows]
    if "kd_overhead" in result:
        o = result["kd_overhead"]
        lines += ["", f"**kd overhead** = kd step / (sft step + teacher forward) = {o['kd_step_s'] * 1000:.1f} / "
                  f"({o['sft_step_s'] * 1000:.1f} + {o['teacher_forward_s'] * 1000:.1f}) ms = "
                  f"**{o['ratio']:.3f}** (target <= {o['target']})"]
    if "kd_cache_vs_sft" in result:
        o = result["kd_cache_vs_sft"]
        lines += ["", f"**kd from the teacher cache** (top-{CACHE_TOP_K}): throughput vs sft = "
                  f"{o['sft_step_s'] * 1000:.1f} / {o['kd_cache_step_s'] * 1000:.1f} ms = "
                  f"**{o['throughput_ratio']:.3f}** (target >= {o['target']})"]
    if result["rollout"]:
        lines += ["", "| rollout batch | new tokens / s |", "|---|---|"]
        lines += [f"| {r['batch']} | {r['tokens_per_s']:.0f} |" for r in result["rollout"]]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
