"""The training engine: ``accelerate`` with DDP or DeepSpeed ZeRO, or FSDP2, on GPUs or on CPU.

    torchrun --nproc_per_node=2 -m kdexp train                      # DDP
    torchrun --nproc_per_node=2 -m kdexp train deepspeed=zero2      # DeepSpeed ZeRO-2
    kdexp train deepspeed=zero3                                         # one process, ZeRO-3
    torchrun --nproc_per_node=2 -m kdexp train fsdp=full_shard      # FSDP2 (kdexp.fsdp)

The loop stays engine-agnostic: it asks this module for an ``Accelerator`` and, under ZeRO-3,
for the full parameters of the engine's model while it generates (validation, final evaluation,
rollouts). The DeepSpeed JSON config is derived from ``train.*`` (micro-batch, accumulation,
clipping; mixed precision through accelerate) and the ``deepspeed=`` preset; ``deepspeed.config``
adds or overrides any DeepSpeed key.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from kdexp import fsdp
from kdexp.errors import UserError


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: DictConfig, accum: int, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (``cfg.deepspeed`` set)."""
    ds, t = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": int(ds.stage)}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.stage == 3:
        # The final student (and OKD's teacher module) is saved as one full state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_param != "none":
            zero["offload_param"] = {"device": ds.offload_param}
    out = {"train_micro_batch_size_per_gpu": int(t.micro_batch_size),
           "gradient_accumulation_steps": accum,
           "train_batch_size": int(t.micro_batch_size) * accum * world,
           "gradient_clipping": float(t.max_grad_norm),
           "zero_optimization": zero,
           "steps_per_print": 10**9}
    extra = OmegaConf.to_container(ds.config, resolve=True) if ds.get("config") else {}
    return _merge(out, extra)


def export_slurm_tasks() -> None:
    """Several tasks of one SLURM job started by submitit (``hydra/launcher=slurm`` with
    ``tasks_per_node`` or ``nodes`` > 1): set torch.distributed's variables (rank, world size,
    master address and port) from SLURM's, so that the tasks train as one run. Nothing to do
    under torchrun / accelerate launch (they set them) or with a single task."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS") or 1) <= 1:
        return
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        raise UserError(f"this SLURM job has {os.environ['SLURM_NTASKS']} tasks but no distributed "
                        f"launcher: use hydra/launcher=slurm, or srun torchrun ... -m kdexp train")
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(cfg: DictConfig, accum: int, world: int) -> Accelerator:
    """The run's ``Accelerator``: ``world`` processes (the launcher's), ``accum`` micro-batches
    per optimizer step, DeepSpeed when ``deepspeed=`` is chosen.

    On a machine without GPUs, several launched processes are joined over gloo (accelerate
    would otherwise start independent copies that overwrite each other's run directory).
    """
    t = cfg.train
    no_gpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {"mixed_precision": t.mixed_precision, "gradient_accumulation_steps": accum,
                              # the schedule counts optimizer steps, whatever the number of processes
                              "step_scheduler_with_optimizer": False}
    if cfg.get("deepspeed") is None:
        accelerator = Accelerator(cpu=t.device == "cpu" or (world > 1 and no_gpu), **kwargs)
        if fsdp.enabled(cfg):
            fsdp.init_group(accelerator.device.type)  # one process: fully_shard still wants a group
        return accelerator
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
    except ImportError as e:
        raise UserError(f"deepspeed=zero{cfg.deepspeed.stage} needs DeepSpeed: "
                        "pip install 'kdexp[deepspeed]'") from e
    if "LOCAL_RANK" not in os.environ:  # one process without a launcher: DeepSpeed still wants one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    if no_gpu or t.device == "cpu":
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        _without_shm_comm()
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, accum, world), zero3_init_flag=False)
    accelerator = Accelerator(deepspeed_plugin=plugin, **kwargs)
    # Models load whole in every process; the engine shards what it trains when it is prepared.
    # Under ZeRO-3 transformers would otherwise partition every model loaded from now on, the
    # frozen teacher included, which then has no engine to gather its layers.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return accelerator


def _without_shm_comm() -> None:
    """DeepSpeed on CPU with its collectives over gloo alone. Otherwise DeepSpeed compiles its
    shared-memory all-reduce (``deepspeed_shm_comm``) the first time a process group starts on a
    machine or in a new environment: a C++ compiler needed, ~30 s on 2 cores. The op table is
    DeepSpeed's own (``deepspeed.ops.__compatible_ops__``); left alone if it has another shape."""
    import deepspeed.ops

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict) and "deepspeed_shm_comm" in ops:
        ops["deepspeed_shm_comm"] = False


def shard(cfg: DictConfig, module: torch.nn.Module) -> torch.nn.Module:
    """Under ``fsdp=``, the models that train sharded in place (before the optimizer is made:
    sharding replaces their parameters); otherwise ``module`` as it is (accelerate's engines
    wrap it when it is prepared)."""
    return fsdp.shard(module, fsdp.options(cfg)) if fsdp.enabled(cfg) else module


def prepare(accelerator: Accelerator, module: torch.nn.Module, optimizer, scheduler) -> tuple:
    """The engine, optimizer and scheduler of the run. A module sharded by :func:`shard` stays
    as it is (accelerate would wrap it in DDP), and its parameters and optimizer state are
    checkpointed as one gathered state (:class:`kdexp.fsdp.ShardedState`)."""
    if fsdp.is_sharded(module):
        accelerator.register_for_checkpointing(fsdp.ShardedState(module, optimizer))
        return module, optimizer, accelerator.prepare(scheduler)
    return accelerator.prepare(module, optimizer, scheduler)


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage of the run, 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def loss_scale(accelerator: Accelerator, engine: torch.nn.Module) -> float:
    """The factor the engine's backward multiplies the loss by before any gradient exists:
    torch AMP's GradScaler scale (fp16), DeepSpeed's current fp16 loss scale, else 1. (Both
    divide by the accumulation count too, which the step's ``loss * len(batches)`` undoes.)
    The fused path computes its gradients in its forward, so it must seed them at this scale
    for float16 gradients not to underflow, as the plain path's are."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    fp16 = getattr(engine, "fp16_enabled", None)
    if zero_stage(accelerator) and callable(fp16) and fp16():
        return float(engine.optimizer.loss_scale)
    return 1.0


def shard_frozen(accelerator: Accelerator, model: torch.nn.Module,
                 engine: torch.nn.Module | None = None) -> torch.nn.Module:
    """Under ZeRO-3, a frozen model (the teacher) partitioned across the processes like the
    student: a DeepSpeed engine of its own, without optimizer, that gathers each layer for its
    forward and releases it after. Under FSDP2 (``engine`` sharded), sharded in place as the
    engine is. Other engines: ``model`` unchanged (it stays whole).

    The model was loaded whole in every process and is partitioned here, so loading still
    needs one copy per process; the forward passes during training then hold one layer at a
    time. Generation gathers it whole (:func:`full_parameters`).
    """
    if engine is not None and fsdp.shard_like(engine, model):
        return model
    if zero_stage(accelerator) != 3:
        return model
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _is_zero3_engine(model: torch.nn.Module) -> bool:
    optimizer = getattr(model, "optimizer", None)
    return hasattr(model, "module") and optimizer is not None and (
        hasattr(optimizer, "parameter_offload") or hasattr(optimizer, "setup_zero_stage3_hooks"))


@contextmanager
def full_parameters(accelerator: Accelerator, *engines: torch.nn.Module | None) -> Iterator[None]:
    """Every parameter of the engines' models present on this process while the block runs.

    A no-op except under ZeRO-3, where the parameters are gathered from their shards and each
    engine's per-module fetch/release hooks are taken off for the block (a generation calls
    the model once per token; with the hooks on, every call would re-gather every layer, in
    lockstep across processes). ``engines``: the trained engine and/or the teacher of
    :func:`shard_frozen`; anything else is skipped. Collective: every process must enter it,
    including those that then do nothing. Under FSDP2 every unit of the sharded models is
    gathered (:func:`kdexp.fsdp.full_parameters`).
    """
    if any(fsdp.is_sharded(e) for e in engines):
        with fsdp.full_parameters(*engines):
            yield
        return
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    sharded = [e for e in engines if e is not None and _is_zero3_engine(e)]
    offloads = [getattr(e.optimizer, "parameter_offload", e.optimizer) for e in sharded]
    params = [p for e in sharded for p in e.module.parameters()]
    with deepspeed.zero.GatheredParameters(params):
        for offload in offloads:
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            for offload in offloads:
                offload.setup_zero_stage3_hooks()


@contextmanager
def gathered_params(*params: torch.nn.Parameter | None) -> Iterator[None]:
    """ZeRO-3's shards of ``params`` gathered while inside, for reading (the fused loss reads an
    LM head outside its module's forward). Collective: every process enters; a no-op for
    parameters that are whole."""
    wanted = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not wanted:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None):
        yield


@contextmanager
def plain_model(accelerator: Accelerator, model: torch.nn.Module,
                engine: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
    """``model`` unwrapped from its engine, dropout off, its full parameters present (gathered
    under ZeRO-3, from ``engine`` when it is the part of a bigger engine), for sampling.
    Collective under ZeRO-3; the model's training mode is restored after."""
    plain = accelerator.unwrap_model(model)
    was_training = plain.training
    plain.eval()
    try:
        with full_parameters(accelerator, engine if engine is not None else model):
            yield plain
    finally:
        plain.train(was_training)


def state_dict(accelerator: Accelerator, engine: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The engine's model's whole state dict on the main process (gathered under ZeRO-3 and
    FSDP2; there, empty elsewhere). Collective."""
    if fsdp.is_sharded(engine):
        found = fsdp.roots(engine)
        if found == [engine]:
            return fsdp.full_state_dict(engine)
        # online KD's pair: each sharded model gathered, under its name in the pair
        names = {id(m): n for n, m in engine.named_modules()}
        return {f"{names[id(r)]}.{k}": v for r in found for k, v in fsdp.full_state_dict(r).items()}
    return accelerator.get_state_dict(engine) or {}


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients (with clipping off, the guard still needs it)."""
    grads = [p.grad for p in params if p.grad is not None]
    return fsdp.local_norm(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())


def clip(accelerator: Accelerator, groups: list[list[torch.nn.Parameter]], max_norm: float) -> list:
    """Clip each parameter group to ``max_norm`` (0: no clipping); the norms before clipping,
    one per group. DeepSpeed clips inside its own step, over all parameters at once: one norm
    (``None`` with clipping off, where it reports none)."""
    zero = zero_stage(accelerator)
    if zero:
        return [None if max_norm <= 0 else accelerator.clip_grad_norm_(groups[0], max_norm)]
    # fp16 (GradScaler): unscaled once for every group (accelerate's clip_grad_norm_ would
    # unscale again for a second group, which GradScaler refuses), so the norms are true ones.
    accelerator.unscale_gradients()
    if max_norm <= 0:
        return [grad_norm(groups[0])]
    return [fsdp.local_norm(torch.nn.utils.clip_grad_norm_(g, max_norm)) for g in groups]


def skipped(accelerator: Accelerator) -> None:
    """After a step whose update was dropped: GradScaler's bookkeeping of the unscaled
    gradients is closed (``update``: the scale backs off if they overflowed), as its own
    ``step`` would have; else the next step's unscale is refused."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        scaler.update()


# accelerate's distributed types in words
ENGINES = {"NO": "a single process, no distributed backend", "MULTI_CPU": "DDP over gloo",
           "MULTI_GPU": "DDP over NCCL", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}


def describe(cfg: DictConfig, accelerator: Accelerator) -> str:
    """Where and how the run trains, for the log: ``cpu, a single process, no distributed
    backend``, ``cuda, DeepSpeed ZeRO-2``, ``cpu, DDP over gloo``, ..."""
    kind = accelerator.distributed_type.value
    how = (f"DeepSpeed ZeRO-{cfg.deepspeed.stage}" if cfg.get("deepspeed") else
           f"FSDP2 ({cfg.fsdp.name}) over {'gloo' if accelerator.device.type == 'cpu' else 'NCCL'}"
           if fsdp.enabled(cfg) else ENGINES.get(kind, kind))
    return f"{accelerator.device.type}, {how}"
