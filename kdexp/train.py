"""The one training loop.

    kdexp train                                        # KD of the bundled tiny teacher on the toy task
    kdexp train method=sft train.max_steps=200
    kdexp train method=kd loss=rkl student=gpt2 teacher=gpt2-xl data=dolly data.path=dolly.jsonl

:func:`run` reads as setup -> steps -> finish. Everything that can be wrong with the inputs is
found first (:mod:`kdexp.checks`), before any model is loaded. :func:`setup` loads the student,
the teacher (:mod:`kdexp.teachers`: live, cached or online, the loop does not ask which) and
the engine; :func:`steps` runs optimizer steps (:class:`kdexp.step.Step`: each gathers
``accum`` micro-batches and gives exactly the gradient of one big batch) with the method's
components between them, validations, checkpoints and the guards (:mod:`kdexp.guards`);
:func:`finish` saves the final student and evaluates it (:mod:`kdexp.finish`). ``accelerate``
supplies the engine (single process, DDP, DeepSpeed) and mixed precision, :mod:`kdexp.fsdp`
the FSDP2 one; the loop does not branch on either.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kdexp import checkpoint, methods, teachers
from kdexp import engine as engines
from kdexp.checks import check_config, check_run_dir, eval_sets, prepare_inputs, requeued
from kdexp.data import collate_train
from kdexp.errors import Stopped, TrainingAborted, UserError
from kdexp.finish import final_evaluation, part_of, save_final, validate
from kdexp.guards import NonFinite, StopSignals, fault_injection
from kdexp.logging import make_logger
from kdexp.models import RouterLoss, load_model
from kdexp.step import BatchStream, Progress, Step, lr_lambda, schedule
from kdexp.teachers.merge import MergeOfThought, branch_schedule
from kdexp.teachers.server import TeacherError

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run once set up: what the steps and the end of the run work with."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Any
    plan: methods.Plan
    tokenizer: Any
    data: dict[str, list]
    teacher: teachers.Teacher
    engine: torch.nn.Module  # what accelerate trains: the student, or the student and the teacher
    student: torch.nn.Module
    step: Step
    scheduler: Any
    stream: BatchStream
    progress: Progress
    ctx: methods.Context
    logger: Any
    setup_s: float


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, save the final student, evaluate it (and the teacher) on the test split."""
    r = setup(cfg, run_dir)
    train_s, tokens = steps(r)
    return finish(r, train_s, tokens)


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Check the inputs, then load the models and build the engine, the optimizer and the state
    that checkpoints hold; resume; let the method's components prepare (teacher outputs, ...)."""
    engines.export_slurm_tasks()  # several SLURM tasks: torch.distributed's variables from SLURM's
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's (torchrun, accelerate, submitit)
    inputs = prepare_inputs(cfg, run_dir, world)  # every problem of the inputs, before any model
    plan, data, t = inputs.plan, inputs.data, cfg.train
    if t.get("epochs") is not None or t.get("warmup_ratio") is not None:
        t.max_steps, t.warmup_steps = schedule(t, len(data["train"]))
        log.info("schedule: %d steps (train.epochs=%s, %d training examples), %d warmup steps",
                 t.max_steps, t.get("epochs"), len(data["train"]), t.warmup_steps)
    accelerator = engines.make_accelerator(cfg, t.batch_size // (t.micro_batch_size * world), world)
    if accelerator.num_processes != world:
        raise UserError(f"launched as {world} processes but the training engine sees "
                        f"{accelerator.num_processes}; check the launcher's environment")
    if accelerator.is_main_process:
        log.info("training on %d process%s (%s)", world, "" if world == 1 else "es",
                 engines.describe(cfg, accelerator))
    if t.num_threads:
        torch.set_num_threads(t.num_threads)

    set_seed(cfg.seed)  # the student is created right after seeding: a random init is reproducible
    student, tokenizer = load_model(cfg.student, "student", inputs.tokenizer)
    router = RouterLoss.attach(student, t.get("router_aux_weight", "auto"), cfg.method.get("sample_weight", "none"))
    teacher = teachers.build(cfg, plan, accelerator, student, tokenizer, inputs)
    module = engines.shard(cfg, teacher.engine_module(student))  # FSDP2: sharded before the optimizer
    groups = [[p for p in student.parameters() if p.requires_grad]]  # one per side, each clipped alone
    lrs = [t.lr]
    for params, lr in teacher.param_groups():
        groups.append(params)
        lrs.append(lr)
    optimizer = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, lrs, strict=True)],
                                  lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    warmup, total, clock = t.warmup_steps, t.max_steps, None
    if mot := next((h for h in plan.hooks if isinstance(h, MergeOfThought)), None):  # one branch's schedule per round
        warmup, total = branch_schedule(mot.k, warmup, total)
        clock = mot.schedule_step
    factor = lr_lambda(warmup, total, t.min_lr_ratio, t.get("lr_schedule") or "linear")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor if clock is None else lambda s: factor(clock(s)))
    engine, optimizer, scheduler = engines.prepare(accelerator, module, optimizer, scheduler)
    student = teacher.prepared(engine)
    stream = BatchStream(len(data["train"]), t.micro_batch_size, world, accelerator.process_index, cfg.seed)
    progress = Progress()
    for state in (stream, progress, plan.objective, *plan.components):
        accelerator.register_for_checkpointing(state)
    ctx = methods.Context(cfg, accelerator, student, teacher, tokenizer, data["train"], t.max_steps,
                          engine=engine, optimizer=optimizer, stream=stream)
    guard = NonFinite(os.environ.get("KDEXP_NAN_AT_ATTEMPT"))
    step = Step(cfg, accelerator, engine, teacher, plan.objective, groups, optimizer, guard, router)

    if accelerator.is_main_process and not t.resume:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    logger = make_logger(cfg, run_dir, accelerator.is_main_process, job_type=cfg.method.name)
    if t.resume:
        latest = checkpoint.load_latest(accelerator, run_dir)  # the newest intact one
        if accelerator.is_main_process:
            logger.truncate_after(progress.step)
        log.info("resumed from %s (step %d)", latest, progress.step)
    started = time.time()  # generating teacher / student outputs before the loop
    for component in plan.components:
        component.setup(ctx, resumed=bool(t.resume))
    return Run(cfg, run_dir, accelerator, plan, tokenizer, data, teacher, engine, student, step, scheduler,
               stream, progress, ctx, logger, time.time() - started)


def validation(r: Run, step: int) -> None:
    """Validate on the main process, log, and hand the loss to the method on every rank."""
    valid = [None]
    with engines.full_parameters(r.accelerator, r.engine):  # every rank: collective
        if r.accelerator.is_main_process:
            valid[0] = validate(r.cfg, r.accelerator.unwrap_model(r.student), r.tokenizer, r.data["valid"])
            r.logger.log(valid[0], step)
            log.info("step %d: validation %s", step, ", ".join(
                f"{k.removeprefix('valid/')} {v:.4g}" for k, v in valid[0].items() if isinstance(v, (int, float))))
    valid = broadcast_object_list(valid)[0]  # DistiLLM's scheduler acts on it on every rank
    for component in r.plan.components:
        component.after_validation(r.ctx, step, valid["valid/loss"])


def micro_batch(r: Run, indices: list[int], micro: int) -> dict[str, torch.Tensor]:
    """Micro-batch ``micro`` of this step: the method's source picks its sequences, the teacher
    adds what it needs (a cache's row indices)."""
    examples = r.plan.source.micro_batch(r.ctx, indices, r.progress.step, micro)
    batch = {**collate_train(examples, r.tokenizer.pad_token_id), **r.teacher.inputs(examples)}
    return {k: v.to(r.accelerator.device) for k, v in batch.items()}


def steps(r: Run) -> tuple[float, int]:
    """Optimizer steps up to ``train.max_steps``: ``(seconds, tokens trained on)``, totals over
    the whole run (a resumed run adds to what its checkpoint recorded)."""
    t, progress, accelerator = r.cfg.train, r.progress, r.accelerator
    # A method that compares validations with the start (DistiLLM) gets one before training.
    if not t.resume and t.eval_every and any(c.validates_first for c in r.plan.components):
        validation(r, 0)
    accum = t.batch_size // (t.micro_batch_size * accelerator.num_processes)
    clock = StepLog(r)
    r.student.train()
    stop = StopSignals()  # SIGTERM / SIGUSR1: checkpoint after this step, then exit
    while progress.step < t.max_steps:
        # a teacher over a network can fail while the step's micro-batches are drawn: their state
        # is kept aside to be put back (components may hold whole buffers: not for other teachers)
        before = [(c, c.state_dict()) for c in (r.stream, *r.plan.components)
                  if r.teacher.remote and getattr(c, "changes_when_drawn", True)]
        failure: TeacherError | None = None
        r.ctx.step = progress.step
        try:
            batches = [micro_batch(r, r.stream.next(), i) for i in range(accum)]
        except TeacherError as err:
            failure = err
        if r.teacher.remote and accelerator.num_processes > 1:  # every process stops if one's teacher failed
            failed = accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "sum")
            if failed.item() and failure is None:
                failure = TeacherError("another process's request to the teacher server failed")
        if failure is not None:  # the state as the last step left it, then a checkpoint
            for component, state in before:
                component.load_state_dict(state)
            stop.restore()
            clock.bar.close()
            raise teacher_down(r, clock, failure) from None
        r.ctx.check_decisions(progress.step)
        n_tokens, reduced, norms, bad = r.step(batches, progress.step)
        if bad:  # the step is taken again with the next batches
            if r.step.guard.consecutive >= t.max_bad_steps:
                r.logger.finish()
                raise TrainingAborted(r.step.guard.abort_message(r.run_dir))
            continue
        r.step.optimizer.step()
        r.scheduler.step()
        r.step.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens += n_tokens
        fault_injection(progress.step)
        clock.done(reduced, norms)
        # After logging (which shows this step's weights), before a checkpoint saves the state.
        r.plan.objective.update(reduced)
        for component in r.plan.components:
            component.after_step(r.ctx, progress.step, reduced)
        if t.eval_every and progress.step % t.eval_every == 0 and progress.step < t.max_steps:
            validation(r, progress.step)
        saved = (t.save_every and progress.step % t.save_every == 0) or progress.step == t.max_steps
        signum = stop.requested(accelerator)
        if saved or signum:
            r.step.guard.check_weights(r.engine, progress.step, r.run_dir)
            progress.seconds = clock.seconds()
            checkpoint.save(accelerator, r.run_dir, progress.step, t.keep_checkpoints)
        if signum and progress.step < t.max_steps:
            r.logger.finish()
            stop.hand_over(signum)  # e.g. submitit: requeue the job, which resumes from here
            raise Stopped(f"stopped by {signal.Signals(signum).name} after step {progress.step} of "
                          f"{t.max_steps}; checkpoint saved in {checkpoint.checkpoint_dir(r.run_dir)}: "
                          f"continue with train.resume=true hydra.run.dir={r.run_dir}", signum)
    stop.restore()
    clock.bar.close()
    return clock.seconds(), progress.tokens


def teacher_down(r: Run, clock: StepLog, err: Exception) -> UserError:
    """The run's one line when its teacher server failed (stayed down, or answered what the run
    cannot use): a checkpoint of the last step is saved (unless it was just saved), from which
    ``train.resume=true`` goes on exactly as an uninterrupted run once the server is back."""
    step = r.progress.step
    saved = checkpoint.list_checkpoints(r.run_dir)
    if step and not (saved and saved[-1].name == f"step_{step:07d}"):
        r.progress.seconds = clock.seconds()
        checkpoint.save(r.accelerator, r.run_dir, step, r.cfg.train.keep_checkpoints)
    r.logger.finish()
    where = (f"checkpoint of step {step} in {checkpoint.checkpoint_dir(r.run_dir)}: continue with "
             f"train.resume=true hydra.run.dir={r.run_dir}" if step else "no step was taken")
    return UserError(f"{err} ({where} once it is back)")


class StepLog:
    """The progress bar and the ``train/*`` metrics, every ``train.log_every`` steps."""

    def __init__(self, r: Run):
        self.r, self.start, self.first = r, time.time(), r.progress.step
        # the run's totals when this process started (a resumed run's checkpoint)
        self.tokens_before, self.seconds_before = r.progress.tokens, r.progress.seconds
        self.bar = tqdm(total=r.cfg.train.max_steps, initial=r.progress.step, desc="train", unit="step",
                        disable=not r.accelerator.is_main_process)

    def seconds(self) -> float:
        """Training seconds of the whole run so far."""
        return self.seconds_before + time.time() - self.start

    def done(self, reduced: dict[str, float], norms: list) -> None:
        r, step = self.r, self.r.progress.step
        self.bar.update(1)
        if step % r.cfg.train.log_every and step != r.cfg.train.max_steps:
            return
        objective, stream = r.plan.objective, r.stream
        weights = objective.weights()
        total = sum(weights[key] * reduced[key] for key in objective.keys)
        if r.step.router is not None:
            total += r.step.router.weight * reduced["router_aux"]
        metrics = {"train/loss": total, **{f"train/{k}": v for k, v in reduced.items()},
                   "train/lr": r.scheduler.get_last_lr()[0],
                   "train/tokens_per_s": (r.progress.tokens - self.tokens_before) / max(time.time() - self.start, 1e-9),
                   "train/teacher_s": r.teacher.total_seconds() / (step - self.first),
                   "train/epoch": stream.epoch + stream.index / stream.per_epoch}
        if norms[0] is not None:
            metrics["train/grad_norm"] = float(norms[0])
        if r.step.guard.skipped:
            metrics["train/skipped_steps"] = r.step.guard.skipped
        if len(norms) > 1 and norms[1] is not None:
            metrics["train/teacher_grad_norm"] = float(norms[1])
        for key, term in zip(objective.keys, objective.terms, strict=True):
            if term.adaptive:
                metrics[f"train/{key}_scale"] = objective.scale(key)
        for component in r.plan.components:
            metrics.update({f"method/{k}": v for k, v in component.metrics().items()})
        r.logger.log(metrics, step)
        self.bar.set_postfix(loss=f"{total:.4f}")


def finish(r: Run, train_s: float, tokens: int) -> dict[str, Any]:
    """Save the final student (and what the teacher learned), evaluate, write results.json."""
    accelerator, run_dir = r.accelerator, r.run_dir
    save_final(accelerator, r.engine, r.tokenizer, run_dir / "final", part=r.teacher.student_part)
    r.teacher.save(r.engine, run_dir)
    results: dict[str, Any] = {}
    with engines.full_parameters(accelerator, r.engine, *r.teacher.gathered()):  # every rank: collective
        if accelerator.is_main_process:
            results = final_evaluation(r.cfg, run_dir, accelerator.unwrap_model(r.student), r.tokenizer,
                                       r.teacher.evaluated(), r.teacher.evaluated_as_loaded)
    if accelerator.is_main_process:
        results["train"] = {"steps": r.progress.step, "time_s": round(train_s, 2),
                            "setup_s": round(r.setup_s, 2), "tokens": tokens}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        r.logger.summary({f"test/{k}": results[k] for k in ("rougeL", "exact_match")})
    r.logger.finish()
    if accelerator.is_main_process:  # last, below anything W&B prints when it finishes
        print(f"\n{(run_dir / 'results.md').read_text()}\nrun directory: {run_dir}\n", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


__all__ = ["BatchStream", "Progress", "Run", "check_config", "check_run_dir", "eval_sets", "lr_lambda",
           "part_of", "prepare_inputs", "requeued", "run", "save_final", "schedule", "validate"]
