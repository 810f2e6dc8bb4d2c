"""vLLM rollouts against kdexp's HF sampler (issue 27, point 3; GPUs with vLLM installed).

    python benchmarks/vllm_rollouts.py                 # writes benchmarks/results/vllm_rollouts.{json,md}

* **Rollout speed**: new tokens per second of the student's rollouts at batch 1, 8 and 32
  (GPT-2-shaped student, 64 new tokens, the toy task's prompts), from kdexp's sampler
  (:func:`kdexp.rollout.sample`) and from a vLLM engine (:class:`kdexp.rollout_vllm.VllmRollouts`,
  which also scores the tokens with the trained model, as training does), in one process.
* **Training**: gkd (every step on-policy, ``method.lmbda=1``) for ``--steps`` steps with
  ``rollout.engine=hf`` and ``rollout.engine=vllm``: both loss curves, their mean relative
  difference and the step times. The samples differ (another random generator), so the curves
  track each other without being equal.

Without vLLM (or a GPU) it writes ``not available`` and exits 0: ``make gpu-check`` reports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def speed(models: list[str], new_tokens: int) -> list[dict]:
    import torch
    from hydra import compose, initialize_config_dir

    from kdexp.config import conf_dir, register_resolvers
    from kdexp.data import load_examples
    from kdexp.models import load_model
    from kdexp.rollout import RolloutSpec, sample
    from kdexp.rollout_vllm import VllmRollouts

    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="bench"):
        cfg = compose("config", overrides=[*models, "logger=none", "rollout.engine=vllm",
                                           f"rollout.max_new_tokens={new_tokens}"])
    torch.manual_seed(0)
    model, tok = load_model(cfg.student, "student")
    model = model.cuda().eval()
    prompts = [e.prompt_ids for e in load_examples(cfg.data, tok, ["test"])["test"]]
    spec = RolloutSpec(do_sample=True, max_new_tokens=new_tokens)
    engine = VllmRollouts(cfg, tok, None)
    engine.sync(model, 0)  # the engine made before timing
    out = []
    for size in (1, 8, 32):
        row = {"batch": size}
        for name in ("hf", "vllm"):
            g = torch.Generator(device="cuda").manual_seed(0)
            tokens, seconds = 0, 0.0
            for start in range(0, max(size * 4, 32), size):
                chunk = prompts[start:start + size]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                drawn = (sample(model, chunk, spec, tok.eos_token_id, tok.pad_token_id, g) if name == "hf"
                         else engine.sample(model, chunk, spec, seed=start, step=0))
                torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
                tokens += sum(len(s.response_ids) for s in drawn)
            row[f"{name}_tokens_per_s"] = tokens / seconds
        row["speedup"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
        out.append(row)
    return out


def train(engine: str, models: list[str], steps: int, root: Path) -> dict:
    run = root / engine
    cmd = [sys.executable, "-m", "kdexp", "train", *models, "method=gkd", "method.lmbda=1.0", f"rollout.engine={engine}",
           "logger=none", f"train.max_steps={steps}", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
           "eval.max_samples=4", "eval.seeds=[10]", "eval.teacher=false", "train.batch_size=16",
           "train.micro_batch_size=16", "train.mixed_precision=bf16", "rollout.max_new_tokens=64",
           f"hydra.run.dir={run}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    return {"loss": [r["train/loss"] for r in rows],
            "step_s": (rows[-1]["time"] - rows[1]["time"]) / (rows[-1]["step"] - rows[1]["step"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    missing = ("no GPU" if not torch.cuda.is_available() else
               "vLLM is not installed" if importlib.util.find_spec("vllm") is None else None)
    if missing:
        result = {"status": f"not available: {missing}"}
        text = f"# vLLM rollouts\n\nNot available on this machine: {missing}.\n"
    else:
        from throughput import gpt2_models

        with tempfile.TemporaryDirectory(prefix="kdexp-vllm-") as tmp:
            models = gpt2_models(Path(tmp))
            rollouts = speed(models, args.new_tokens)
            runs = {e: train(e, models, args.steps, Path(tmp)) for e in ("hf", "vllm")}
        diff = statistics.fmean(abs(a - b) / abs(a) for a, b in zip(runs["hf"]["loss"], runs["vllm"]["loss"], strict=True))
        result = {"status": 0, "device": torch.cuda.get_device_name(), "rollouts": rollouts, "training": runs,
                  "mean_relative_loss_difference": diff,
                  "step_time_ratio": runs["vllm"]["step_s"] / runs["hf"]["step_s"]}
        text = "\n".join([
            f"# vLLM rollouts ({result['device']})", "",
            "| batch | HF sampler tokens/s | vLLM tokens/s | speedup |", "|---|---|---|---|",
            *[f"| {r['batch']} | {r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | {r['speedup']:.2f} |"
              for r in rollouts], "",
            f"gkd, {args.steps} steps, every step on-policy: step time vLLM / HF = {result['step_time_ratio']:.2f}; "
            f"loss curves differ by {100 * diff:.1f} % on average (other samples, the same distribution).", ""])
    (args.out / "vllm_rollouts.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "vllm_rollouts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
