"""Where an on-policy step's time goes: kdexp's sampler, ``model.generate``, and the training part.

    python benchmarks/sampler_profile.py --device cuda          # GPT-2 shapes (124M student, 355M teacher)
    python benchmarks/sampler_profile.py --smoke                # CPU, tiny shapes (the test suite runs this)

On-policy distillation (GKD with lmbda = 1, Agarwal et al., ICLR 2024) spends most of a step
sampling the student. This measures, on the same random GPT-2-shaped models and prompts
(16 prompts, 48 new tokens, temperature 1, every row forced to the full length so both samplers
produce the same number of tokens):

- ``kdexp``: ``kdexp.rollout.sample`` (KV cache, one forward per token);
- ``generate``: transformers' ``model.generate`` (what TRL's GKDTrainer and DistillationTrainer call);
- ``generate static cache``: ``generate`` with a static KV cache, which transformers compiles
  (CUDA graphs), the usual way to remove per-token launch overhead (GPU only);
- ``train``: the rest of the step: teacher forward, student forward and backward on the
  sampled batch (prompt + response), AdamW step;
- a ``torch.profiler`` trace of kdexp's sampler: the host's time against the device kernels'
  time, i.e. whether sampling is bound by the GPU or by Python and kernel launches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, warmup: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def models(args: argparse.Namespace, root: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if args.smoke:
        shapes = {"student": {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 512},
                  "teacher": {"n_embd": 96, "n_layer": 3, "n_head": 2, "vocab_size": 512}}
    else:
        shapes = {"student": {}, "teacher": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}
    torch.manual_seed(0)
    out = {name: GPT2LMHeadModel(GPT2Config(**shape, **no_dropout)).to(args.device) for name, shape in shapes.items()}
    for m in out.values():
        m.generation_config.pad_token_id = m.config.eos_token_id
    return out["student"], out["teacher"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=18)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 1 repeat")
    parser.add_argument("--no-compile", action="store_true", help="skip the static-cache + torch.compile generate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.repeat, args.batch, args.new_tokens, args.no_compile = "cpu", 1, 4, 6, True
    from kdexp.rollout import RolloutSpec, sample

    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = models(args, Path(tmp))
    student.eval()
    teacher.eval()
    vocab = student.config.vocab_size
    gen = torch.Generator(device=args.device).manual_seed(0)
    prompts = torch.randint(0, vocab - 1, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    spec = RolloutSpec(temperature=1.0, max_new_tokens=args.new_tokens)
    no_eos = -1  # no row stops early: both samplers produce batch x new_tokens tokens
    rows: dict[str, dict] = {}

    def kdexp_sample():
        return sample(student, prompts.tolist(), spec, eos_id=no_eos, pad_id=0, generator=gen)

    seconds, out = timed(kdexp_sample, args.device, args.repeat, 1 if args.smoke else 2)
    tokens = sum(len(s.response_ids) for s in out)
    rows["kdexp"] = {"seconds": seconds, "tokens": tokens}

    ids = prompts.to(args.device)

    def hf_generate(model=student, **extra):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              **extra)

    seconds, out = timed(hf_generate, args.device, args.repeat, 1 if args.smoke else 2)
    rows["generate"] = {"seconds": seconds, "tokens": int(out[:, ids.shape[1]:].numel())}

    # the rest of an on-policy step, on the sampled batch
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = out.detach()

    def train_part():
        with torch.no_grad():
            t_logits = teacher(batch).logits.float()
        s_logits = student(batch).logits.float()
        loss = torch.nn.functional.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1),
                                          log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, _ = timed(train_part, args.device, args.repeat, 1)
    rows["train"] = {"seconds": seconds, "tokens": int(batch.numel())}
    student.eval()

    # profile kdexp's sampler: host time against device kernel time
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sync(args.device)
    start = time.perf_counter()
    with profile(activities=acts) as prof:
        kdexp_sample()
        sync(args.device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if args.device == "cuda" else 0.0
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    profile_row = {"wall_s": wall, "device_kernels_s": device_us / 1e6,
                   "device_busy": (device_us / 1e6) / wall if wall else None,
                   "kernel_launches_per_token": launches / max(1, args.new_tokens),
                   "top_host_ops": [(e.key, round(e.self_cpu_time_total / 1e3, 1), e.count) for e in top]}

    if not args.no_compile and args.device == "cuda":
        # transformers compiles the decoding step itself (CUDA graphs) when the cache is static;
        # compiling ``forward`` by hand under generate fails (outputs of one graph replay are
        # overwritten by the next: seen on an H200, torch 2.11).
        name = "generate static cache (transformers' own compile)"
        try:
            start = time.perf_counter()
            hf_generate(cache_implementation="static")
            compile_s = time.perf_counter() - start
            seconds, out = timed(lambda: hf_generate(cache_implementation="static"), args.device, args.repeat, 2)
            rows[name] = {"seconds": seconds, "tokens": int(out[:, ids.shape[1]:].numel()), "first_call_s": compile_s}
        except Exception as e:  # reported, not fatal: the other rows stand
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "new_tokens": args.new_tokens,
              "rows": rows, "profile": profile_row}
    lines = [f"# Where an on-policy step's time goes ({result['device']}, torch {torch.__version__})", "",
             f"`python benchmarks/sampler_profile.py --device {args.device}`: {args.batch} prompts x "
             f"{args.new_tokens} new tokens, float32, GPT-2 shapes" + (" (smoke: tiny)" if args.smoke else ""), "",
             "| part | ms | tokens | tokens / s |", "|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['tokens']} | {r['tokens'] / r['seconds']:.0f} |")
    p = profile_row
    lines += ["", f"kdexp's sampler under torch.profiler: {p['wall_s'] * 1e3:.0f} ms wall, device kernels "
              f"{p['device_kernels_s'] * 1e3:.0f} ms (busy {100 * (p['device_busy'] or 0):.0f}%), "
              f"{p['kernel_launches_per_token']:.0f} kernel launches per new token.", "",
              "Top host ops (self CPU ms, calls): " + "; ".join(f"{k} {ms} ({n})" for k, ms, n in p["top_host_ops"])]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sampler_profile_smoke" if args.smoke else "sampler_profile"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
