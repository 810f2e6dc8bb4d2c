"""kdexp's GKD against TRL's GKDTrainer on identical settings: time per optimizer step and peak memory.

    python benchmarks/trl_gkd.py                        # tiny models, lmbda 0.5, about 2 minutes on 2 idle cores
    python benchmarks/trl_gkd.py --lmbda 1 --beta 0.9 --steps 100
    python benchmarks/trl_gkd.py --device cuda --shape gpt2   # GPT-2-shaped 124M student, 355M teacher

GKD is generalized knowledge distillation (Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist &
Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
ICLR 2024): with probability lmbda a micro-batch is sampled from the student, and the loss is
the generalized JSD(beta) between teacher and student on every response token. Both sides
run it here, each in a fresh process, in this one invocation, with ``pip install trl==1.16.0``:

* **kdexp**: ``kdexp train method=gkd`` in-process (logging to ``metrics.jsonl`` only, no
  validation, no checkpoint before the end). The time of step i is ``time`` at step i minus at
  step i-1 in ``metrics.jsonl`` (``train.log_every=1``).
* **TRL**: ``trl.experimental.gkd.GKDTrainer``, the time of step i is the wall time between
  the ``on_step_end`` callbacks of steps i-1 and i (the whole loop iteration, as for kdexp).

Model loading, the first ``--warmup`` steps and kdexp's final checkpoint and test evaluation are
not timed. Both sides sample from the student on the same steps: TRL's own coin
(``random.random() <= lmbda`` in ``GKDTrainer.training_step``) is driven by kdexp's draws, a
callback setting ``GKDTrainer.lmbda`` to 1 or 0 before each step from kdexp's decision for that
step (checked: the parent compares every step's kind). A step that samples costs several times
one that does not, so the **time per optimizer step** is the expectation at lmbda,
``lmbda * median(on-policy steps) + (1 - lmbda) * median(off-policy steps)``, per side (medians:
robust to a busy machine's spikes); both medians and the raw median are reported too. **Peak
memory** is the process's peak resident set size (VmHWM) up to the end of the last step (on
CUDA: ``torch.cuda.max_memory_allocated``), and, separately, the peak during training above the
memory at its start (VmHWM reset by ``/proc/self/clear_refs`` when training starts). Ratios are
kdexp / TRL; the target is kdexp at least 1.5x faster per step (ratio <= 0.667) at no more peak
memory (ratio <= 1). Both processes run with ``OMP_WAIT_POLICY=PASSIVE`` (unless set): on a
shared machine, spinning OpenMP threads turn every other process's time slice into 3-10x
slower, erratic steps.

Identical on both sides: the student (the bundled tiny student, randomly initialized by kdexp's
own loader under the run seed, so the same weights) and teacher; the training examples (the
toy train split as kdexp tokenizes it, handed to TRL as token ids, in kdexp's batch order: TRL's
sampler is sequential over that order, so step i sees the same batch, checked by its token
count); which steps are on-policy; batch size per optimizer step (no accumulation);
``max_new_tokens``; lmbda; beta; sampling at ``--temperature`` with top-k and top-p off; the
loss at softmax temperature 1 (TRL's GKD loss takes no temperature); fp32; AdamW
(``torch.optim.AdamW``, the same learning rate, betas and weight decay) with kdexp's
warmup/decay schedule, passed to TRL as its optimizer and scheduler; gradient clipping at 1; the
sequence limit (``data.max_length``: 160 tokens, never reached with prompts <= 64 and
``--new-tokens`` <= 96); the thread count; no logging, evaluation or checkpoints during
training. TRL's GKDConfig defaults that differ from that are overridden:
``gradient_checkpointing`` (True there), ``bf16`` (True), the sampling temperature (0.9).

The beta convention: TRL's ``generalized_jsd_loss`` mixes ``m = beta p + (1 - beta) q`` (p the
teacher, q the student) and returns ``beta KL(p || m) + (1 - beta) KL(q || m)``, with beta = 0
forward KL and beta = 1 reverse KL, exactly kdexp's ``loss=jsd`` (Agarwal et al., Eq. 3): they
are the same, not mirror images, so ``--beta`` is passed unchanged to both. The script checks
this on random logits before it measures anything.

Not identical (also listed in the markdown output): the student's samples (each side's own
random stream) and the sampler (kdexp's KV-cache sampler, stopping each sequence at EOS, vs
``model.generate``); the padding (kdexp pads on the right, TRL's collator on the left, without
position ids); the loss normalization of an on-policy step (kdexp: the tokens of the sampled
batch; TRL: transformers' ``num_items_in_batch``, counted on the dataset batch before it is
replaced by samples). With those, the two students drift apart, and so do the lengths of their
samples: the tokens per step of each kind are reported beside the times. TRL disables dropout in
the student (the tiny models have none; the GPT-2 shapes are built without it); kdexp records
two log-probabilities per sampled token and logs every step for its timing. Each side's peak
RSS includes its own imports (TRL brings datasets, pandas, pyarrow).

Results: ``benchmarks/results/trl_gkd.json`` and ``benchmarks/results/trl_gkd.md``.
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

from procmem import reset_peak_rss, status_bytes  # benchmarks/procmem.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 1024**2
SIDES = ("kdexp", "trl")
TRAINERS = {"gkd": "GKDTrainer", "distillation": "DistillationTrainer"}
SPEEDUP_TARGET = 2.0  # kdexp at least 2x faster per optimizer step (issue 25)
SAMPLES = ("the student's samples (each side's own random stream) and sampler (kdexp's KV-cache sampler, "
           "per-sequence stop at EOS; TRL: model.generate)")
NOT_IDENTICAL = {"gkd": [
    SAMPLES,
    "padding: kdexp right-pads training batches, TRL's collator left-pads them (no position ids)",
    "loss normalization on on-policy steps: kdexp divides by the sampled batch's tokens, TRL by "
    "transformers' num_items_in_batch of the dataset batch drawn before sampling",
    "so the students drift apart, and with them the lengths of their samples (tokens / step above)",
    "TRL disables dropout in the student (the tiny models have none, the GPT-2 shapes are built without it)",
    "kdexp logs every step (needed for its per-step times) and keeps two log-probabilities per sampled token",
    "peak RSS includes each side's own imports (TRL also imports datasets, pandas, pyarrow)",
], "distillation": [
    SAMPLES,
    "so the students drift apart, and with them the lengths of their samples (tokens / step above)",
    "the loss: TRL projects both models' hidden states through their heads chunk by chunk (its own "
    "chunked generalized JSD), kdexp through its fused path; the same divergence, normalized by the "
    "sampled tokens on both sides",
    "padding: TRL left-pads prompts and right-pads completions, kdexp right-pads prompt + response",
    "kdexp logs every step (needed for its per-step times) and keeps two log-probabilities per sampled token",
    "peak RSS includes each side's own imports (TRL also imports datasets, pandas, pyarrow)",
]}


# -- what both sides are told -----------------------------------------------------------------

def overrides(args: argparse.Namespace, models: Path | None) -> list[str]:
    """kdexp's command line for the run; the TRL side reads its settings from the same config."""
    out = ["method=gkd", "method.kd_weight=1", f"method.lmbda={args.lmbda}", "method.seq_kd=false",
           f"loss.beta={args.beta}", "loss.temperature=1.0", f"rollout.temperature={args.temperature}",
           "rollout.top_p=1.0", "rollout.top_k=0", f"rollout.max_new_tokens={args.new_tokens}",
           f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
           f"train.micro_batch_size={args.batch}", "train.warmup_steps=5", "train.max_grad_norm=1.0",
           "train.mixed_precision=no", f"train.num_threads={args.threads}", "train.log_every=1",
           "train.save_every=0", "train.eval_every=0", "logger=none", "eval.max_samples=4",
           "eval.seeds=[10]", "eval.teacher=false", f"eval.max_new_tokens={args.new_tokens}",
           f"train.device={'cpu' if args.device == 'cpu' else 'auto'}"]
    if models is not None:
        out += [f"student.name_or_path={models / 'student'}", "student.init=random",
                f"teacher.name_or_path={models / 'teacher'}", "teacher.init=pretrained"]
    return out


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdexp.config import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="bench"):
        return hydra_compose("config", overrides=overrides)


def gpt2_models(root: Path) -> Path:
    """GPT-2-shaped random models with the bundled tokenizer: a 124M student (``GPT2Config()``,
    config only: both sides initialize it under the seed) and a 355M teacher (n_embd 1024,
    n_layer 24, n_head 16, weights saved). Dropout off and the special ids set to the
    tokenizer's, so that both sides stop sampling at the same EOS."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kdexp.models import ASSETS

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-student")
    ids = {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id or tok.eos_token_id}
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    shapes = {"student": {}, "teacher": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}
    for name, shape in shapes.items():
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        config = GPT2Config(**shape, **no_dropout, **ids)
        if name == "teacher":
            torch.manual_seed(0)
            GPT2LMHeadModel(config).save_pretrained(path)
        else:
            config.save_pretrained(path)
        for f in (ASSETS / "tiny-student").glob("tokenizer*"):
            shutil.copy(f, path / f.name)
    return root


def beta_convention(trainer: str, betas: tuple[float, ...] = (0.0, 0.1, 0.5, 0.9, 1.0)) -> dict:
    """kdexp's ``jsd(beta)`` against TRL's loss at ``beta`` on random logits [3, 5, 11]
    (GKDTrainer's ``generalized_jsd_loss``; DistillationTrainer's chunked loss over hidden states
    equal to the logits and identity heads, which averages over positions): the identity mapping
    must agree, and the mirror ``1 - beta`` must not (else the check could not tell them apart)."""
    import torch

    from kdexp.losses.divergences import generalized_jsd

    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    if trainer == "gkd":
        from trl.experimental.gkd import GKDTrainer

        def trl(beta: float) -> torch.Tensor:  # [3, 5]: TRL's per-entry values summed over the vocabulary
            return GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, reduction="none").sum(-1)

        def ours(beta: float) -> torch.Tensor:
            return generalized_jsd(student, teacher, beta=beta)
    else:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        eye, mask = torch.eye(11, dtype=torch.float64), torch.ones(3, 5)

        def trl(beta: float) -> torch.Tensor:  # the mean over the 15 positions
            return _chunked_divergence_loss(student, teacher, eye, eye, mask, beta)[0].detach()

        def ours(beta: float) -> torch.Tensor:
            return generalized_jsd(student, teacher, beta=beta).mean()

    same = max(float((ours(b) - trl(b)).abs().max()) for b in betas)
    mirror = float((ours(0.1) - trl(0.9)).abs().max())
    if same > (1e-9 if trainer == "gkd" else 1e-5) or mirror < 1e-3:  # its chunked loss runs in float32
        raise RuntimeError(f"kdexp's jsd and TRL's {TRAINERS[trainer]} loss disagree at equal beta "
                           f"(max |diff| {same:.3g}; mirrored {mirror:.3g}): map beta before comparing")
    return {"mapping": "identity (trl beta = kdexp loss.beta)", "max_abs_diff": same,
            "mirrored_max_abs_diff": mirror, "betas": list(betas)}


# -- inside each fresh process ----------------------------------------------------------------

class Probe:
    """This process's memory when training starts and when its last step is done."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.at: dict[str, float] = {}

    def start(self) -> None:
        import torch

        self.at["hwm_before"] = status_bytes("VmHWM")
        self.at["rss_start"] = status_bytes("VmRSS")
        self.at["hwm_reset"] = int(reset_peak_rss())  # the kernel's high-water mark from here on
        if self.cuda:
            self.at["cuda_start"] = torch.cuda.memory_allocated()

    def stop(self) -> None:
        import torch

        if "hwm_training" in self.at:
            return
        self.at["hwm_training"] = status_bytes("VmHWM")
        if self.cuda:
            torch.cuda.synchronize()
            self.at["cuda_peak"] = torch.cuda.max_memory_allocated()

    def result(self) -> dict:
        a = self.at
        if self.cuda:
            peak, start, training = a["cuda_peak"], a["cuda_start"], a["cuda_peak"]
        else:
            peak, start, training = max(a["hwm_before"], a["hwm_training"]), a["rss_start"], a["hwm_training"]
        return {"memory": "cuda max_memory_allocated" if self.cuda else "peak RSS (VmHWM)",
                "peak_mib": peak / MIB, "start_mib": start / MIB, "above_start_mib": (training - start) / MIB,
                "hwm_reset": bool(a.get("hwm_reset", 1))}


def kdexp_child(args: argparse.Namespace, models: Path | None, work: Path) -> dict:
    """``kdexp train`` in this process. Two functions of its loop are wrapped, unchanged in what
    they return, to record each micro-batch's origin and target tokens (``collate_train``) and
    the memory when the loop starts and ends (``checkpoint.save``, called once, after the last step)."""
    import kdexp.checkpoint
    import kdexp.train
    from kdexp.cli import main as kdexp_main
    from kdexp.losses.objective import IGNORE_INDEX

    probe, batches = Probe(args.device), []
    collate, save = kdexp.train.collate_train, kdexp.checkpoint.save

    def recorded_collate(examples, pad_id):
        if not batches:
            probe.start()
        batch = collate(examples, pad_id)
        batches.append({"on_policy": any(e.origin == "student" for e in examples),
                        "tokens": int((batch["targets"] != IGNORE_INDEX).sum())})
        return batch

    def recorded_save(*a, **k):
        probe.stop()
        return save(*a, **k)

    kdexp.train.collate_train, kdexp.checkpoint.save = recorded_collate, recorded_save
    run = work / "run"
    kdexp_main(["train", *overrides(args, models), f"hydra.run.dir={run}"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if "train/loss" in r}
    steps = [{"step": s, "seconds": times[s] - times[s - 1], **batches[s - 1]}
             for s in range(2, args.steps + 1)]
    return {"steps": steps, **probe.result()}


def kdexp_coin(seed: int, step: int) -> float:
    """kdexp's draw for "is micro-batch 0 of optimizer step ``step`` (from 0) on-policy":
    ``Context.uniform("on-policy", step, 0)``, a pure function of the seed and the position."""
    import torch

    from kdexp.methods.context import stable_seed

    g = torch.Generator().manual_seed(stable_seed(seed, "decision", "on-policy", step, 0))
    return torch.rand(1, generator=g, dtype=torch.float64).item()


def trl_child(args: argparse.Namespace, models: Path | None, work: Path) -> dict:
    """TRL's GKDTrainer (``--trainer gkd``) or DistillationTrainer (``--trainer distillation``) on
    the models, examples and optimizer of the kdexp config."""
    import torch
    from accelerate.utils import set_seed
    from datasets import Dataset
    from transformers import TrainerCallback

    from kdexp.data import load_examples
    from kdexp.models import load_model, load_tokenizer
    from kdexp.train import BatchStream, lr_lambda

    cfg = compose(overrides(args, models))
    t = cfg.train
    torch.set_num_threads(args.threads)
    # kdexp's order: tokenizer, data, seed, student (randomly initialized here), teacher.
    tokenizer = load_tokenizer(cfg.student, "student")
    train = load_examples(cfg.data, tokenizer, ["train"])["train"]
    set_seed(cfg.seed)
    student, tokenizer = load_model(cfg.student, "student", tokenizer)
    teacher, _ = load_model(cfg.teacher, "teacher")
    teacher.requires_grad_(False).eval()
    device = torch.device(args.device)
    student.to(device)
    teacher.to(device)

    stream = BatchStream(len(train), t.batch_size, 1, 0, cfg.seed)  # kdexp's batches, in its order
    order = [i for _ in range(t.max_steps) for i in stream.next()]
    rows = [{"prompt": tokenizer.decode(train[i].prompt_ids),  # unused: the ids below are
             "input_ids": train[i].prompt_ids + train[i].response_ids,
             "completion_mask": [0] * len(train[i].prompt_ids) + [1] * len(train[i].response_ids)}
            for i in order]
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps,
                                                                       t.min_lr_ratio))
    common = dict(output_dir=str(work / "trl"), per_device_train_batch_size=t.batch_size,
                  gradient_accumulation_steps=1, max_steps=t.max_steps, learning_rate=t.lr,
                  max_grad_norm=t.max_grad_norm, seed=cfg.seed, beta=args.beta, temperature=args.temperature,
                  bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=args.device == "cpu",
                  report_to="none", logging_strategy="no", eval_strategy="no", save_strategy="no",
                  disable_tqdm=True)
    if args.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(**common, lmbda=args.lmbda, max_new_tokens=args.new_tokens, seq_kd=False,
                           max_length=cfg.data.max_length, train_sampling_strategy="sequential")
    else:
        from trl import DistillationConfig, DistillationTrainer

        # On-policy only; the prompts are kdexp's own token ids (see ``prompt_dataset``), the
        # sampling order kdexp's (no shuffling), dropout off as in GKDTrainer.
        config = DistillationConfig(**common, max_completion_length=args.new_tokens, shuffle_dataset=False,
                                    disable_dropout=True, top_p=1.0, top_k=0, use_vllm=False,
                                    pad_to_multiple_of=None)

    probe = Probe(args.device)
    record = {"on_policy": False, "tokens": 0}
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            probe.start()
            self.last = clock()

        def on_step_begin(self, _args, state, *_, **__):
            # GKDTrainer samples when random.random() <= self.lmbda: at 1 or 0 it follows kdexp's coin.
            if args.trainer == "gkd":
                trainer.lmbda = 1.0 if kdexp_coin(cfg.seed, state.global_step) < args.lmbda else 0.0
            else:
                record["on_policy"] = True  # DistillationTrainer samples every step

        def on_step_end(self, _args, state, *_, **__):
            now = clock()
            steps.append({"step": state.global_step, "seconds": now - self.last, "on_policy": record["on_policy"],
                          "tokens": int(record["tokens"])})
            record.update(on_policy=False, tokens=0)
            self.last = now

        def on_train_end(self, *_, **__):
            probe.stop()

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    if args.trainer == "gkd":
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, optimizers=(optimizer, scheduler), callbacks=[StepTimer()])
        # Instance attributes over two methods, to record what each step trained on (nothing else changes).
        generate, compute_loss = trainer.generate_on_policy_outputs, trainer.compute_loss

        def recorded_generate(*a, **k):
            record["on_policy"] = True
            return generate(*a, **k)

        def recorded_loss(model, inputs, *a, **k):
            record["tokens"] += (inputs["labels"][:, 1:] != -100).sum()  # the tokens the loss is taken on
            return compute_loss(model, inputs, *a, **k)

        trainer.generate_on_policy_outputs = recorded_generate
    else:
        prompt_ids = {f"{i}: {r['prompt']}": r["input_ids"][: r["completion_mask"].index(1)]
                      for i, r in enumerate(rows)}
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                      train_dataset=Dataset.from_list([{"prompt": k} for k in prompt_ids]),
                                      processing_class=tokenizer, optimizers=(optimizer, scheduler),
                                      callbacks=[StepTimer()])
        compute_loss = trainer.compute_loss

        def recorded_tokenize(prompts):  # kdexp's prompt ids, not a re-tokenization of their text
            return [prompt_ids[p] for p in prompts], None, {}

        def recorded_loss(model, inputs, *a, **k):
            record["tokens"] += inputs["completion_mask"].sum()
            return compute_loss(model, inputs, *a, **k)

        trainer._tokenize_prompts = recorded_tokenize
    trainer.compute_loss = recorded_loss
    trainer.train()
    return {"steps": [s for s in steps if s["step"] >= 2], **probe.result()}


# Under --profile: the training loop of each side and the student's sampling inside it, by
# (file name, function name) in cProfile's cumulative times.
LOOPS = {"kdexp": ("train.py", "steps"), "trl": ("trainer.py", "_inner_training_loop")}
SAMPLERS = {"kdexp": ("rollout.py", "sample"), "trl": ("generation/utils.py", "generate")}


def profiled(side: str, fn):
    """Run ``fn`` under cProfile; its result and the loop's seconds, the sampling's seconds
    within it, and the top functions by own time. cProfile slows Python-heavy code more than
    kernels, so the shares are indicative, and the timed steps of a profiled run are not used."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}

    def cumulative(where: tuple[str, str]) -> float:
        return sum(v[3] for (f, _, name), v in stats.items() if f.endswith(where[0]) and name == where[1])

    loop, sampling = cumulative(LOOPS[side]), cumulative(SAMPLERS[side])
    loading = ("import", "bootstrap", "marshal", "builtins.exec", "_io.open_code")  # model and module loading
    top = sorted(((k, v) for k, v in stats.items() if not any(w in f"{k[0]}:{k[2]}" for w in loading)),
                 key=lambda kv: kv[1][2], reverse=True)[:10]
    return result, {"loop_s": loop, "sampling_s": sampling, "sampling_share": sampling / loop if loop else None,
                    "top_own_time": [[f"{Path(f).name}:{name}", round(v[2], 3)] for (f, _, name), v in top]}


def child(args: argparse.Namespace) -> None:
    def side():
        return (kdexp_child if args.child == "kdexp" else trl_child)(args, args.models, args.work)

    if args.profile:
        result, result["profile"] = profiled(args.child, side)
    else:
        result = side()
    (args.work / "child.json").write_text(json.dumps(result) + "\n")


# -- the parent: run both, reduce, report -------------------------------------------------------

def run_side(side: str, args: argparse.Namespace, models: Path | None, work: Path, profile: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--work", str(work),
           *passthrough(args), *(["--models", str(models)] if models else []), *(["--profile"] if profile else [])]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((work / "child.json").read_text())


def passthrough(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
            "--threads", str(args.threads), "--lmbda", str(args.lmbda), "--beta", str(args.beta),
            "--temperature", str(args.temperature), "--device", args.device, "--trainer", args.trainer]


def profile_sides(args: argparse.Namespace, models: Path | None, work: Path) -> dict:
    """One more run of each side under cProfile (its step times not used)."""
    return {side: run_side(side, args, models, work / f"{side}-profile", profile=True)["profile"] for side in SIDES}


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    """One side's step time (expectation at lmbda of the per-kind medians) and memory (median
    over rounds), from its runs' steps after the warm-up."""
    steps = [s for r in runs for s in r["steps"] if s["step"] > args.warmup]
    on = [s["seconds"] for s in steps if s["on_policy"]]
    off = [s["seconds"] for s in steps if not s["on_policy"]]
    weights = {"on": args.lmbda, "off": 1 - args.lmbda}
    medians = {"on": statistics.median(on) if on else None, "off": statistics.median(off) if off else None}
    for kind, w in weights.items():
        if w > 0 and medians[kind] is None:
            raise RuntimeError(f"no timed {kind}-policy step after the warm-up at lmbda {args.lmbda}: raise --steps")
    step_s = sum(w * medians[k] for k, w in weights.items() if w > 0)

    def mean_tokens(kind: bool) -> float | None:
        n = [s["tokens"] for s in steps if s["on_policy"] is kind]
        return statistics.fmean(n) if n else None

    return {"step_s": step_s, "step_s_on_policy": medians["on"], "step_s_off_policy": medians["off"],
            "step_s_median_all": statistics.median(s["seconds"] for s in steps),
            "steps_on_policy": len(on), "steps_off_policy": len(off),
            "tokens_on_policy": mean_tokens(True), "tokens_off_policy": mean_tokens(False),
            "memory": runs[0]["memory"],
            **{k: statistics.median(r[k] for r in runs) for k in ("peak_mib", "start_mib", "above_start_mib")},
            "rounds": [{"steps": r["steps"], **{k: r[k] for k in ("peak_mib", "start_mib", "above_start_mib")}}
                       for r in runs]}


def same_steps(kdexp_runs: list[dict], trl_runs: list[dict]) -> int:
    """Both sides sampled from the student on the same steps, and trained on the same dataset
    batch on the others (equal target tokens); the number of steps compared."""
    compared = 0
    for a, b in zip(kdexp_runs, trl_runs, strict=True):
        for s, other in zip(a["steps"], b["steps"], strict=True):
            if s["step"] != other["step"] or s["on_policy"] != other["on_policy"]:
                raise RuntimeError(f"step {s['step']}: kdexp {'sampled' if s['on_policy'] else 'did not sample'} "
                                   f"from the student, TRL (step {other['step']}) did the opposite")
            if not s["on_policy"] and s["tokens"] != other["tokens"]:
                raise RuntimeError(f"step {s['step']}: kdexp trained on {s['tokens']} dataset tokens, "
                                   f"TRL on {other['tokens']}: the batches differ")
            compared += 1
    return compared


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "accelerate", "trl", "datasets")}


def markdown(result: dict, args: argparse.Namespace) -> str:
    k, t, r, m = result["sides"]["kdexp"], result["sides"]["trl"], result["ratios"], result["machine"]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.1f}"

    def tok(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    lines = [f"# kdexp vs TRL {TRAINERS[args.trainer]} ({args.shape} models, {args.device}, this machine, one run)", "",
             f"`python benchmarks/trl_gkd.py --trainer {args.trainer}` - lmbda {args.lmbda}, beta {args.beta}, {args.batch} sequences "
             f"per step, up to {args.new_tokens} new tokens, sampling temperature {args.temperature}, "
             f"{args.threads} threads, {args.steps} steps x {args.rounds} round(s) per side "
             f"(first {args.warmup} untimed); trl {result['versions']['trl']}, transformers "
             f"{result['versions']['transformers']}, torch {result['versions']['torch']}; 1-minute load "
             f"average {m['load_average_1min'][0]} before, {m['load_average_1min'][1]} after, on {m['cpus']} CPUs.", "",
             f"| side | ms / step at lmbda | on-policy ms (n) | off-policy ms (n) | median of all | "
             f"tokens / step on, off | {k['memory']} MiB | above start MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in (("kdexp", k), ("TRL", t)):
        lines.append(f"| {name} | {ms(s['step_s'])} | {ms(s['step_s_on_policy'])} ({s['steps_on_policy']}) | "
                     f"{ms(s['step_s_off_policy'])} ({s['steps_off_policy']}) | {ms(s['step_s_median_all'])} | "
                     f"{tok(s['tokens_on_policy'])}, {tok(s['tokens_off_policy'])} | {s['peak_mib']:.0f} | "
                     f"{s['above_start_mib']:.0f} |")
    target = result["target"]
    lines += ["", f"**kdexp / TRL**: step time **{r['step_time']:.3f}** (kdexp {r['speedup']:.2f}x faster; "
              f"target >= {target['speedup']}x: {'met' if target['speed_met'] else 'not met'}), peak memory "
              f"**{r['peak_memory']:.3f}** (target <= 1: {'met' if target['memory_met'] else 'not met'}), "
              f"memory above start {r['above_start_memory']:.3f}.", "",
              f"Checked on all {result['same_steps_checked']} timed steps: the same steps sampled from the student "
              f"on both sides, the others trained on the same dataset batch (equal target tokens). "
              f"Beta: {result['beta_convention']['mapping']}, checked on random logits "
              f"(max |diff| {result['beta_convention']['max_abs_diff']:.1e}).", "",
              "Not identical between the two sides:", ""]
    lines += [f"- {x}" for x in result["not_identical"]]
    if result.get("profile"):
        lines += ["", "Under cProfile (one more run per side, its times not used above; cProfile slows Python "
                  "more than kernels, so shares are indicative):", "",
                  "| side | training loop s | sampling the student s | sampling share | most own time |",
                  "|---|---|---|---|---|"]
        for name, side in (("kdexp", "kdexp"), ("TRL", "trl")):
            pr = result["profile"][side]
            top = ", ".join(f"{f} {t}" for f, t in pr["top_own_time"][:3])
            lines.append(f"| {name} | {pr['loop_s']:.1f} | {pr['sampling_s']:.1f} | "
                         f"{100 * (pr['sampling_share'] or 0):.0f}% | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (no accumulation)")
    parser.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens of the student's samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lmbda", type=float, default=0.5, help="probability of an on-policy batch")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (0 fkl, 1 rkl; both sides)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the student")
    parser.add_argument("--warmup", type=int, default=3, help="first steps not timed (at least 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per side (steps pooled)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=["tiny", "gpt2"], default="tiny",
                        help="tiny: the bundled models; gpt2: random GPT-2-shaped 124M student, 355M teacher")
    parser.add_argument("--trainer", choices=list(TRAINERS), default="gkd",
                        help="TRL's GKDTrainer (lmbda as given) or its on-policy DistillationTrainer (lmbda 1)")
    parser.add_argument("--profile", action="store_true",
                        help="also run each side once under cProfile: the sampling's share of its training loop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.warmup < 1 or args.steps <= args.warmup + 1:
        parser.error("--warmup must be >= 1 and --steps > --warmup + 1")
    if args.trainer == "distillation":
        if args.lmbda != parser.get_default("lmbda") and args.lmbda != 1:
            parser.error("--trainer distillation is on-policy only: drop --lmbda (it is 1 there)")
        args.lmbda = 1.0

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    convention = beta_convention(args.trainer)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        models = gpt2_models(Path(tmp) / "models") if args.shape == "gpt2" else None
        # Interleaved, so that a slow spell of a shared machine hits both sides alike.
        for r in range(args.rounds):
            for side in SIDES:
                runs[side].append(run_side(side, args, models, Path(tmp) / f"{side}{r}"))
                print(f"round {r}: {side:<6} done", flush=True)
        profile = profile_sides(args, models, Path(tmp)) if args.profile else None
    sides = {side: summarize(runs[side], args) for side in SIDES}
    k, t = sides["kdexp"], sides["trl"]
    ratios = {"step_time": k["step_s"] / t["step_s"], "speedup": t["step_s"] / k["step_s"],
              "peak_memory": k["peak_mib"] / t["peak_mib"],
              "above_start_memory": k["above_start_mib"] / t["above_start_mib"]}
    # Other processes on the machine distort every timing: the load average says how much.
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "threads": args.threads, "device": args.device,
                          "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
              "versions": versions(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child", "work", "models")},
              "kdexp_overrides": overrides(args, None), "beta_convention": convention,
              "same_steps_checked": same_steps(runs["kdexp"], runs["trl"]),
              "sides": sides, "ratios": ratios,
              "target": {"speedup": SPEEDUP_TARGET, "speed_met": ratios["speedup"] >= SPEEDUP_TARGET,
                         "memory_met": ratios["peak_memory"] <= 1.0},
              "not_identical": NOT_IDENTICAL[args.trainer], "profile": profile}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "trl_gkd" if args.trainer == "gkd" else "trl_distillation"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result, args)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
