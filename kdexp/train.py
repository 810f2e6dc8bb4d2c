"""The one training loop.

    kdexp train                                        # KD of the bundled tiny teacher on the toy task
    kdexp train method=sft train.max_steps=200
    kdexp train method=kd loss=rkl student=gpt2 teacher=gpt2-xl data=dolly data.path=dolly.jsonl

Read top to bottom: check the config, load data and models, build the objective the method
declares, then loop over optimizer steps. Each step gathers ``accum`` micro-batches, counts
their valid target tokens over all processes, and backpropagates each micro-batch's share of
the token mean, so gradient accumulation and data parallelism give exactly the gradient of
one big batch. ``accelerate`` supplies the engine (single process, DDP, DeepSpeed) and mixed
precision; the loop does not branch on either.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from kdexp import checkpoint, config, methods, teacher_cache
from kdexp import engine as engines
from kdexp.data import collate_train, load_examples
from kdexp.data.sources import load_test_split
from kdexp.errors import Problems, Stopped, TrainingAborted, UserError
from kdexp.evaluation import evaluate_generation, format_table, teacher_forced_nll
from kdexp.logging import make_logger
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.models import load_model, load_tokenizer, logit_width, same_tokenizer, shared_vocab, vocab_rows

log = logging.getLogger(__name__)


class BatchStream:
    """Seeded, resumable micro-batches: a fresh permutation per epoch, this process's share.

    Each global micro-batch holds ``micro_batch_size * world`` examples; process ``rank`` takes
    its slice. The position ``(epoch, index)`` is checkpointed, so a resumed run sees exactly
    the batches the uninterrupted run would have seen.
    """

    def __init__(self, n: int, micro_batch_size: int, world: int, rank: int, seed: int):
        self.n, self.mbs, self.world, self.rank, self.seed = n, micro_batch_size, world, rank, seed
        self.per_epoch = self.check(n, micro_batch_size, world)
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    @staticmethod
    def check(n: int, micro_batch_size: int, world: int) -> int:
        """Micro-batches per epoch; at least one, or a one-line error."""
        if n < micro_batch_size * world:
            raise UserError(f"the training split has {n} examples, fewer than one micro-batch of "
                            f"{micro_batch_size} x {world} processes; lower train.micro_batch_size")
        return n // (micro_batch_size * world)

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        start = (self.index * self.world + self.rank) * self.mbs
        self.index += 1
        return self._order[start:start + self.mbs]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


class Progress:
    """The optimizer step counter, checkpointed with the rest of the state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def lr_lambda(warmup: int, total: int, min_ratio: float, kind: str = "linear"):
    """Linear warmup to the peak over ``warmup`` steps, then ``kind``: a linear or cosine decay
    to ``min_ratio`` x peak at ``total``, or constant (MiniLLM's PPO stage)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(min_ratio, 1.0 - (1.0 - min_ratio) * progress)

    return factor


def schedule(train: DictConfig, n_examples: int) -> tuple[int, int]:
    """``(max_steps, warmup_steps)`` of a run on ``n_examples`` training examples.

    ``train.epochs``, when set, replaces ``train.max_steps`` with ``epochs x n_examples /
    batch_size`` steps, rounded up; ``train.warmup_ratio``, when set, replaces
    ``train.warmup_steps`` with that fraction of the steps, rounded (the papers' "warmup 3 %").
    """
    steps = int(train.max_steps)
    if train.get("epochs") is not None:
        steps = max(1, math.ceil(float(train.epochs) * n_examples / int(train.batch_size)))
    warmup = int(train.warmup_steps)
    if train.get("warmup_ratio") is not None:
        warmup = round(float(train.warmup_ratio) * steps)
    return steps, warmup


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def requeued() -> bool:
    """Whether SLURM restarted this job (preemption, time-out, ``scontrol requeue``)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to start a second run in a directory that already holds one (unless resuming).

    A job that SLURM requeued continues from its last checkpoint as if ``train.resume=true``
    was given (same run directory, same W&B run), or starts over if it died before its first.
    """
    if requeued() and not cfg.train.resume:
        has_checkpoint = bool(checkpoint.list_checkpoints(run_dir))
        log.info("requeued by SLURM (restart %s): %s", os.environ["SLURM_RESTART_COUNT"],
                 "resuming from the last checkpoint" if has_checkpoint else "no checkpoint yet, starting over")
        if has_checkpoint:
            with open_dict(cfg):
                cfg.train.resume = True
        elif int(os.environ.get("RANK") or 0) == 0:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (run_dir / "config.yaml").unlink(missing_ok=True)
    if cfg.train.resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise UserError(f"train.resume=true but {run_dir} has no checkpoint; "
                            f"point hydra.run.dir at the run to continue")
        saved = _leaves(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
        now = _leaves(OmegaConf.to_container(cfg, resolve=True))
        changed = sorted(k for k in saved.keys() | now.keys()
                         if not k.startswith(("train.resume", "logger.")) and saved.get(k) != now.get(k))
        if changed:
            raise UserError(f"train.resume=true with a different config than the run in {run_dir}: "
                            f"{', '.join(changed[:5])}; resume with the original overrides")
    elif (run_dir / "config.yaml").exists() and int(os.environ.get("RANK") or 0) == 0:
        # Only the first process asks: it writes config.yaml once the run starts, and another
        # process may look after that.
        raise UserError(f"{run_dir} already holds a run; continue it with train.resume=true, "
                        f"or choose another hydra.run.dir")


def cache_vocab(cache: teacher_cache.TeacherCache, student: torch.nn.Module, tokenizer) -> int | None:
    """``teacher.source=cache``: the logit width to compare on (as
    :func:`kdexp.models.shared_vocab`: the tokenizer's tokens when either model is padded)."""
    rows = vocab_rows(student)
    vocab = logit_width(rows, cache.vocab, len(tokenizer), "cached teacher")
    if (vocab or rows) < cache.top_k:
        raise UserError(f"the teacher cache holds top-{cache.top_k} entries but the student has "
                        f"{vocab or rows} logits")
    return vocab


def check_config(cfg: DictConfig, world: int = 1) -> tuple[Problems, methods.Plan | None]:
    """Every problem of a training config found without loading anything: value ranges, the
    method's parameters, and combinations that make no sense. ``(problems, plan)``."""
    problems = Problems(config.problems(cfg))
    eval_sets(cfg, problems)
    plan = None
    with problems.check(consequences=True):  # the method's own parameters, whatever the loss
        method = methods.METHODS.get(cfg.method.name)
        method.source(cfg), method.online(cfg)
    if not any(p.startswith("loss.") for p in problems):  # else its problems are reported already
        with problems.check(consequences=True):
            plan = methods.build(cfg)
    t = cfg.train
    with problems.check(consequences=True):
        accum, rest = divmod(t.batch_size, t.micro_batch_size * world)
        if rest or accum == 0:
            raise UserError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                            f"train.micro_batch_size ({t.micro_batch_size}) x {world} processes")
    if plan is None:
        return problems, plan
    if plan.objective.sample_weight != "none" and cfg.get("deepspeed"):
        problems.add(f"method.sample_weight={plan.objective.sample_weight} is normalized over the optimizer "
                     f"step by rescaling the accumulated gradients, which DeepSpeed's fused step does not "
                     f"allow: train it without deepspeed= (DDP or one process)")
    from_cache = cfg.teacher.get("source") == "cache"
    if from_cache and (plan.online is not None or type(plan.source) is not methods.Source
                       or any(c.needs_teacher for c in plan.hooks)):
        problems.add(f"teacher.source=cache serves methods that train on the dataset text (sft, kd, "
                     f"taid, ...); method={cfg.method.name} generates or trains sequences the cache "
                     f"cannot hold: use teacher.source=live")
    elif plan.needs_teacher and not from_cache and not cfg.teacher.get("name_or_path"):
        problems.add(f"method={cfg.method.name} needs a teacher; choose one with teacher=NAME")
    return problems, plan


def eval_sets(cfg: DictConfig, problems: Problems, read: bool = False) -> dict[str, DictConfig]:
    """The configs of ``eval.sets`` (the final evaluation's data sets), each problem recorded;
    ``read``: also read each set's test records, so a missing file stops the run before training
    rather than after it."""
    from kdexp import jobs

    sets: dict[str, DictConfig] = {}
    for name in cfg.eval.get("sets") or []:
        with problems.check():
            sets[name] = jobs.eval_set(cfg, name)
            if read:
                try:
                    load_test_split(OmegaConf.to_container(sets[name].data))
                except UserError as err:
                    raise UserError(f"evaluation set {name} (eval.sets): {err}; MiniLLM's processed "
                                    f"sets are read under eval.data_dir") from None
    return sets


class Inputs(NamedTuple):
    plan: methods.Plan
    tokenizer: Any
    data: dict[str, list]
    teacher_tokenizer: Any  # None: not needed, or from the cache
    cache: teacher_cache.TeacherCache | None


def prepare_inputs(cfg: DictConfig, run_dir: Path, world: int) -> Inputs:
    """Check the config, the run directory, the tokenizers, the data and the teacher cache
    before any model is loaded; every problem at once."""
    problems, plan = check_config(cfg, world)
    with problems.check():
        check_run_dir(cfg, run_dir)
    tokenizer = teacher_tok = data = cache = None
    with problems.check(consequences=True):
        tokenizer = load_tokenizer(cfg.student, "student")
    wants_teacher = plan is not None and (plan.needs_teacher or cfg.eval.teacher)
    if wants_teacher and cfg.teacher.get("name_or_path") and cfg.teacher.source == "live":
        with problems.check(consequences=True):
            teacher_tok = load_tokenizer(cfg.teacher, "teacher")
            if tokenizer is not None:
                same_tokenizer(tokenizer, teacher_tok, (cfg.student.name_or_path, cfg.teacher.name_or_path))
    if tokenizer is not None:
        with problems.check(consequences=True):
            data = load_examples(cfg.data, tokenizer)
            BatchStream.check(len(data["train"]), cfg.train.micro_batch_size, world)
    eval_sets(cfg, problems, read=True)
    if data is not None and cfg.teacher.source == "cache" and not problems:
        with problems.check():
            cache = teacher_cache.open_cache(cfg, data["train"], tokenizer,
                                             teacher_cache.temperature_of(plan.objective.teacher_temperatures))
    problems.raise_if_any()
    return Inputs(plan, tokenizer, data, teacher_tok, cache)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, save the final student, evaluate it (and the teacher) on the test split."""
    engines.export_slurm_tasks()  # several SLURM tasks: torch.distributed's variables from SLURM's
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's (torchrun, accelerate, submitit)
    # Everything that can be wrong with the inputs is found here, before any model is loaded.
    plan, tokenizer, data, teacher_tok, cache = prepare_inputs(cfg, run_dir, world)
    t = cfg.train
    if t.get("epochs") is not None or t.get("warmup_ratio") is not None:
        t.max_steps, t.warmup_steps = schedule(t, len(data["train"]))
        log.info("schedule: %d steps (train.epochs=%s, %d training examples), %d warmup steps",
                 t.max_steps, t.get("epochs"), len(data["train"]), t.warmup_steps)
    accum = t.batch_size // (t.micro_batch_size * world)
    accelerator = engines.make_accelerator(cfg, accum, world)
    if accelerator.num_processes != world:
        raise UserError(f"launched as {world} processes but the training engine sees "
                        f"{accelerator.num_processes}; check the launcher's environment")
    if accelerator.is_main_process:
        log.info("training on %d process%s (%s)", world, "" if world == 1 else "es",
                 f"DeepSpeed ZeRO-{cfg.deepspeed.stage}" if cfg.get("deepspeed") else
                 accelerator.distributed_type.value)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    objective = plan.objective

    # The student is created right after seeding, so a random init is reproducible.
    set_seed(cfg.seed)
    student, tokenizer = load_model(cfg.student, "student", tokenizer)
    teacher, vocab = None, None
    from_cache = cache is not None
    if from_cache:
        vocab = cache_vocab(cache, student, tokenizer)
    wants_teacher_eval = cfg.eval.teacher and cfg.teacher.name_or_path and not from_cache
    if (plan.needs_teacher and not from_cache) or wants_teacher_eval:
        teacher, teacher_tok = load_model(cfg.teacher, "teacher", teacher_tok)
        vocab = shared_vocab(student, tokenizer, teacher, teacher_tok,
                             (cfg.student.name_or_path, cfg.teacher.name_or_path))
        if plan.online is not None:  # online KD: the teacher trains a module of its own
            teacher = plan.online.attach(teacher).to(accelerator.device)
        else:
            teacher.requires_grad_(False).eval().to(accelerator.device)

    pad_id = tokenizer.pad_token_id

    # The engine trains one module: the student, or (online KD) the student and the teacher
    # with its module, one parameter group each, each clipped on its own.
    groups = [[p for p in student.parameters() if p.requires_grad]]
    engine: torch.nn.Module = student
    if plan.online is not None:
        engine = methods.Pair(student, teacher, plan.online.virtual_tokens)
        groups.append([p for p in teacher.parameters() if p.requires_grad])
    lrs = [t.lr] + ([plan.online.lr] if plan.online is not None else [])
    optimizer = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, lrs, strict=True)],
                                  lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio, t.get("lr_schedule") or "linear"))
    engine, optimizer, scheduler = accelerator.prepare(engine, optimizer, scheduler)
    student = engine if plan.online is None else accelerator.unwrap_model(engine).student
    zero = engines.zero_stage(accelerator)
    if teacher is not None and plan.online is None and zero == 3:
        teacher = engines.shard_frozen(accelerator, teacher)
        if accelerator.is_main_process:
            log.info("the teacher is partitioned across the %d processes (ZeRO-3)", world)
    stream = BatchStream(len(data["train"]), t.micro_batch_size, world,
                         accelerator.process_index, cfg.seed)
    progress = Progress()
    accelerator.register_for_checkpointing(stream)
    accelerator.register_for_checkpointing(progress)
    accelerator.register_for_checkpointing(objective)
    for component in plan.components:
        accelerator.register_for_checkpointing(component)
    ctx = methods.Context(cfg, accelerator, student, teacher, tokenizer, vocab, data["train"], t.max_steps,
                          engine=engine)

    if accelerator.is_main_process and not t.resume:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    logger = make_logger(cfg, run_dir, accelerator.is_main_process, job_type=cfg.method.name)
    if t.resume:
        latest = checkpoint.load_latest(accelerator, run_dir)  # the newest intact one
        if accelerator.is_main_process:
            logger.truncate_after(progress.step)
        log.info("resumed from %s (step %d)", latest, progress.step)
    setup_start = time.time()  # generating teacher / student outputs before the loop
    for component in plan.components:
        component.setup(ctx, resumed=bool(t.resume))
    setup_time = time.time() - setup_start

    def validation(step: int) -> None:
        """Validate on the main process, log, and hand the loss to the method on every rank."""
        valid = [None]
        with engines.full_parameters(accelerator, engine):  # every rank: collective
            if accelerator.is_main_process:
                valid[0] = validate(cfg, accelerator.unwrap_model(student), tokenizer, data["valid"])
                logger.log(valid[0], step)
        valid = broadcast_object_list(valid)[0]  # DistiLLM's scheduler acts on it on every rank
        for component in plan.components:
            component.after_validation(ctx, step, valid["valid/loss"])

    # A method that compares validations with the start (DistiLLM) gets one before training.
    if not t.resume and t.eval_every and any(c.validates_first for c in plan.components):
        validation(0)

    def micro_batch(indices: list[int], micro: int) -> dict[str, torch.Tensor]:
        examples = plan.source.micro_batch(ctx, indices, progress.step, micro)
        batch = collate_train(examples, pad_id)
        if cache is not None:
            batch["cache_rows"] = cache.row_indices(examples)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def reduce_sum(values: dict[str, float]) -> dict[str, float]:
        return {k: accelerator.reduce(torch.tensor(float(v), device=accelerator.device), "sum").item()
                for k, v in values.items()}

    def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out if vocab is None else out[..., :vocab]  # [B, T, V]

    start_time, tokens_seen = time.time(), 0
    first_step, teacher_seconds = progress.step, 0.0  # the teacher's share of the step time
    bar = tqdm(total=t.max_steps, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_main_process)
    student.train()
    guard = NonFinite(os.environ.get("KDEXP_NAN_AT_ATTEMPT"))
    stop = StopSignals()  # SIGTERM / SIGUSR1: checkpoint after this step, then exit
    while progress.step < t.max_steps:
        batches = [micro_batch(stream.next(), i) for i in range(accum)]
        ctx.check_decisions(progress.step)
        # Every micro-batch's loss is divided by the token count of the whole step, over all
        # processes (per term: a term may cover some rows only); DDP then averages gradients
        # over `world`, which the factor undoes.
        local = {"all": sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)}
        for b in batches:
            for key, n in objective.token_counts(b).items():
                local[key] = local.get(key, 0) + n
        counts = reduce_sum(local)
        n_tokens = counts.pop("all")
        step_parts: dict[str, float] = {}
        for batch in batches:
            with accelerator.accumulate(engine):  # no gradient sync before the step's last
                if plan.online is not None:  # both models, both with gradients
                    student_logits, teacher_logits = (
                        x if vocab is None else x[..., :vocab]
                        for x in engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
                else:
                    student_logits = logits_of(student, batch)
                    teacher_logits = None
                if objective.needs_teacher and plan.online is None:
                    started = _clock(accelerator.device)
                    if cache is not None:
                        teacher_logits = cache.logits(batch["cache_rows"], batch["targets"],
                                                      student_logits.shape[-1])
                    else:
                        with torch.no_grad(), accelerator.autocast():
                            teacher_logits = logits_of(teacher, batch)
                    teacher_seconds += _clock(accelerator.device) - started
                loss, parts = objective(student_logits, teacher_logits, batch,
                                        {k: n / world for k, n in counts.items()})
                loss = guard.inject(loss)
                # The engines divide by the accumulation count; the loss is already a share
                # of the whole step's token mean.
                accelerator.backward(loss * accum)
            for k, v in parts.items():
                step_parts[k] = step_parts.get(k, 0.0) + v.item()
        # The step's term values, token means over all processes: logged, and fed to the
        # objective's running scales and the method's hooks (the same numbers on every rank).
        reduced = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item()
                   for k, v in step_parts.items()}
        # Sample weights are normalized over the whole step: the micro-batches used raw ones.
        factor = objective.normalize_step(reduced)
        if factor != 1.0:
            for group in groups:
                for p in group:
                    if p.grad is not None:
                        p.grad.mul_(factor)
        if t.max_grad_norm <= 0:
            norms = [None if zero else _grad_norm(groups[0])]
        elif zero:  # DeepSpeed clipped inside its step, over all parameters at once
            norms = [accelerator.clip_grad_norm_(groups[0], t.max_grad_norm)]
        else:
            norms = [accelerator.clip_grad_norm_(g, t.max_grad_norm) for g in groups]
        grad_norm = norms[0]
        bad = guard.check(reduced, norms, progress.step + 1)  # the same verdict on every rank
        if bad:  # skipped: no update, the step is taken again with the next batches
            optimizer.zero_grad(set_to_none=True)
            if guard.consecutive >= t.max_bad_steps:
                logger.finish()
                raise TrainingAborted(guard.abort_message(run_dir))
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        tokens_seen += n_tokens
        bar.update(1)
        _fault_injection(progress.step)
        if progress.step % t.log_every == 0 or progress.step == t.max_steps:
            weights = objective.weights()
            total = sum(weights[key] * reduced[key] for key in objective.keys)
            elapsed = time.time() - start_time
            metrics = {"train/loss": total, **{f"train/{k}": v for k, v in reduced.items()},
                       "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                       "train/teacher_s": teacher_seconds / (progress.step - first_step),
                       "train/epoch": stream.epoch + stream.index / stream.per_epoch}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if guard.skipped:
                metrics["train/skipped_steps"] = guard.skipped
            if len(norms) > 1 and norms[1] is not None:
                metrics["train/teacher_grad_norm"] = float(norms[1])
            for key, term in zip(objective.keys, objective.terms, strict=True):
                if term.adaptive:
                    metrics[f"train/{key}_scale"] = objective.scale(key)
            for component in plan.components:
                metrics.update({f"method/{k}": v for k, v in component.metrics().items()})
            logger.log(metrics, progress.step)
            bar.set_postfix(loss=f"{total:.4f}")
        # After logging (which shows this step's weights), before a checkpoint saves the state.
        objective.update(reduced)
        for component in plan.components:
            component.after_step(ctx, progress.step, reduced)
        if t.eval_every and progress.step % t.eval_every == 0 and progress.step < t.max_steps:
            validation(progress.step)
        saved = (t.save_every and progress.step % t.save_every == 0) or progress.step == t.max_steps
        signum = stop.requested(accelerator)
        if saved or signum:
            guard.check_weights(engine, progress.step, run_dir)
            checkpoint.save(accelerator, run_dir, progress.step, t.keep_checkpoints)
        if signum and progress.step < t.max_steps:
            logger.finish()
            stop.hand_over(signum)  # e.g. submitit: requeue the job, which resumes from here
            raise Stopped(f"stopped by {signal.Signals(signum).name} after step {progress.step} of "
                          f"{t.max_steps}; checkpoint saved in {checkpoint.checkpoint_dir(run_dir)}: "
                          f"continue with train.resume=true hydra.run.dir={run_dir}", signum)
    stop.restore()
    bar.close()
    train_time = time.time() - start_time

    final = run_dir / "final"
    unwrapped = accelerator.unwrap_model(student)
    save_final(accelerator, engine, tokenizer, final, part=None if plan.online is None else "student")
    if plan.online is not None:  # the teacher's module, as a PEFT adapter (the base is untouched)
        module, state = part_of(accelerator, engine, "teacher")
        if accelerator.is_main_process:
            module.save_pretrained(run_dir / "final_teacher_adapter", state_dict=state)
        accelerator.wait_for_everyone()
    results: dict[str, Any] = {}
    with engines.full_parameters(accelerator, engine, teacher):  # every rank: collective
        if accelerator.is_main_process:
            plain_teacher = None if teacher is None else accelerator.unwrap_model(teacher)
            results = final_evaluation(cfg, run_dir, unwrapped, tokenizer, plain_teacher)
    if accelerator.is_main_process:
        results["train"] = {"steps": progress.step, "time_s": round(train_time, 2),
                            "setup_s": round(setup_time, 2), "tokens": tokens_seen}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        logger.summary({f"test/{k}": results[k] for k in ("rougeL", "exact_match")})
    logger.finish()
    if accelerator.is_main_process:  # last, below anything W&B prints when it finishes
        print(f"\n{(run_dir / 'results.md').read_text()}\nrun directory: {run_dir}\n", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients (with clipping off, the guard still needs it)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class NonFinite:
    """The guard against NaN / inf: a step whose loss terms or gradient norm are not finite is
    skipped (no update, a warning); ``train.max_bad_steps`` consecutive ones abort the run.

    The loss terms are means over all processes and the gradients are already synchronized, so
    every rank reaches the same verdict. ``KDEXP_NAN_AT_ATTEMPT=3,4`` (tests) makes the loss of
    the 3rd and 4th step attempts (counting skipped ones) NaN.
    """

    def __init__(self, inject_at: str | None = None):
        self.attempt, self.consecutive, self.skipped = 0, 0, 0
        self.inject_at = {int(a) for a in inject_at.split(",")} if inject_at else set()
        self.last = ""

    def inject(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.attempt + 1 in self.inject_at else loss

    def check(self, parts: dict[str, float], norms: list, step: int) -> bool:
        """Whether this step attempt is bad (and must be skipped)."""
        self.attempt += 1
        bad = [k for k, v in parts.items() if not math.isfinite(v)]
        bad += [f"grad_norm[{i}]" for i, n in enumerate(norms) if n is not None and not math.isfinite(float(n))]
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive, self.skipped = self.consecutive + 1, self.skipped + 1
        self.last = f"step {step}: {', '.join(bad)} not finite"
        log.warning("%s; the step is skipped (%d in a row, %d in all)", self.last, self.consecutive, self.skipped)
        return True

    def abort_message(self, run_dir: Path) -> str:
        kept = checkpoint.list_checkpoints(run_dir)
        return (f"{self.consecutive} consecutive steps had a non-finite loss or gradient (train.max_bad_steps; "
                f"last: {self.last}); the run stops with its last good checkpoint "
                f"{'intact: ' + kept[-1].name if kept else 'none (none was written yet)'}: lower train.lr, "
                f"check the data, or train in float32")

    @staticmethod
    def check_weights(model: torch.nn.Module, step: int, run_dir: Path) -> None:
        """Never checkpoint non-finite weights (a finite step with a huge lr can make them)."""
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.numel()):
            raise TrainingAborted(f"the weights are not finite after step {step}; nothing was saved, the "
                                  f"checkpoints in {checkpoint.checkpoint_dir(run_dir)} are the last good "
                                  f"ones: lower train.lr or raise train.warmup_steps")


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM sends before a time limit: ``--signal=USR1@120``;
    submitit asks for USR2) ask the loop to checkpoint after the current step and exit; the
    previous handlers are restored after the loop. With several processes the request is
    shared (one small all-reduce a step), so every rank stops after the same step.

    A handler that was there before (submitit's, which requeues the job on USR2) is called
    after the checkpoint: the requeued job resumes from it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {}
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning("received %s: checkpointing after this step, then exiting", signal.Signals(signum).name)

    def requested(self, accelerator: Accelerator) -> int:
        """The signal received by any process (0: none)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())

    def hand_over(self, signum: int) -> None:
        """Call the handler that was installed before ours for ``signum`` (it may exit)."""
        self.restore()
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, None)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _fault_injection(step: int) -> None:
    """``KDEXP_KILL_AT_STEP=N``: SIGKILL this process right after optimizer step N.

    For the tests that prove resumption: the process dies as a preempted job does, with no
    chance to clean up, between a step and its checkpoint.
    """
    at = os.environ.get("KDEXP_KILL_AT_STEP")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def validate(cfg: DictConfig, model: torch.nn.Module, tokenizer, valid: list) -> dict[str, float]:
    """Validation loss on the whole split (a mean per token or per sequence, ``eval.loss_mean``,
    as ``kdexp eval`` reports it), ROUGE-L / exact match on its first examples (one seed)."""
    subset = valid[: cfg.train.eval_samples]
    eval_cfg = {**OmegaConf.to_container(cfg.eval, resolve=True), "seeds": list(cfg.eval.seeds)[:1]}
    summary, _ = evaluate_generation(model, tokenizer, subset, eval_cfg, desc="validate")
    return {"valid/loss": teacher_forced_nll(model, valid, tokenizer.pad_token_id,
                                             cfg.eval.batch_size, per=cfg.eval.loss_mean),
            "valid/rougeL": summary["rougeL"], "valid/exact_match": summary["exact_match"]}


def part_of(accelerator: Accelerator, engine: torch.nn.Module, part: str | None,
            ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A submodule of the engine's model and its full state dict (gathered under ZeRO-3)."""
    state = accelerator.get_state_dict(engine) or {}  # ZeRO-3: gathered on the main process only
    unwrapped = accelerator.unwrap_model(engine)
    if part is None:
        return unwrapped, state
    return getattr(unwrapped, part), {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(f"{part}.")}


def save_final(accelerator: Accelerator, engine: torch.nn.Module, tokenizer, final: Path,
               part: str | None = None) -> None:
    """The final student as a Hugging Face directory (LoRA merged in; the adapter kept beside).

    ``part``: the student is that submodule of the engine's model (online KD trains a pair).
    """
    unwrapped, state = part_of(accelerator, engine, part)
    if accelerator.is_main_process:
        if hasattr(unwrapped, "merge_and_unload"):  # a PEFT model
            unwrapped.save_pretrained(final.with_name("final_adapter"), state_dict=state)
            copy.deepcopy(unwrapped).merge_and_unload().save_pretrained(final)
        else:
            unwrapped.save_pretrained(final, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(final)
    accelerator.wait_for_everyone()


def final_evaluation(cfg: DictConfig, run_dir: Path, student: torch.nn.Module, tokenizer,
                     teacher: torch.nn.Module | None) -> dict[str, Any]:
    """Evaluate the student (and the teacher) on the test split, or on every set of
    ``eval.sets`` (then the top-level numbers are the average over the sets); print and return
    the table. Each set is scored exactly as ``kdexp eval RUN`` scores it (``jobs.score_set``
    on ``jobs.eval_set``: the run's data with ``eval.data`` applied, not the training encoding)."""
    from kdexp import jobs

    models = {"student": student}
    if teacher is not None and cfg.eval.teacher:
        models = {"teacher": teacher, "student": student}
    gen_dir = run_dir / "generations"
    gen_dir.mkdir(exist_ok=True)

    def write(name: str, generations: list) -> None:
        with (gen_dir / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generations)

    if cfg.eval.get("sets"):
        return _evaluate_sets(cfg, run_dir, models, tokenizer, write)
    test = jobs.eval_set(cfg, None)
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        rows[name], generations = jobs.score_set(model, tokenizer, test, desc=name)
        write(f"test_{name}", generations)
    table = format_table(rows, title=f"test split of data={cfg.data.name} ({rows['student']['n']} prompts)")
    (run_dir / "results.md").write_text(table + "\n")
    results = {k: rows["student"][k] for k in ("rougeL", "rougeL_std", "exact_match", "exact_match_std")}
    results.update({"split": "test", "student": rows["student"]})
    if "teacher" in rows:
        results["teacher"] = rows["teacher"]
    return results


def _evaluate_sets(cfg: DictConfig, run_dir: Path, models: dict[str, torch.nn.Module], tokenizer,
                   write) -> dict[str, Any]:
    from kdexp import jobs

    sets = eval_sets(cfg, Problems())
    results: dict[str, Any] = {"split": "test", "eval": cfg.eval.name}
    tables = []
    for who, model in models.items():
        rows = {}
        for name, set_cfg in sets.items():
            rows[name], generations = jobs.score_set(model, tokenizer, set_cfg, desc=f"{who} {name}")
            write(f"{name}_{who}", generations)
        average = {k: statistics.fmean(r[k] for r in rows.values()) for k in jobs.SCALARS}
        for k in ("rougeL", "exact_match"):  # the std over seeds of the per-seed averages
            per_seed = [statistics.fmean(r["per_seed"][i][k] for r in rows.values())
                        for i in range(len(cfg.eval.seeds))]
            average[f"{k}_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        results[who] = {**average, "sets": rows}
        tables.append(jobs.sets_table(who, rows, cfg.eval.name))
    results.update({k: results["student"][k] for k in ("rougeL", "rougeL_std", "exact_match", "exact_match_std")})
    (run_dir / "results.md").write_text("\n\n".join(tables) + "\n")
    return results
