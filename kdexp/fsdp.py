"""FSDP2: PyTorch's own sharding (``torch.distributed.fsdp.fully_shard``), without accelerate.

    torchrun --nproc_per_node=2 -m kdexp train fsdp=full_shard      # parameters, gradients, optimizer sharded
    torchrun --nproc_per_node=2 -m kdexp train fsdp=shard_grad_op   # parameters kept whole between forward and backward

accelerate (1.16) would turn FSDP into DDP on CPU, so kdexp shards the models itself and keeps
accelerate for what it does either way (the process group, autocast, the accumulation count,
RNG states in checkpoints). Each decoder layer (the classes a Hugging Face model names in
``_no_split_modules``) is one FSDP unit, and the rest (embeddings, final norm, LM head) is the
root's: the root's parameters stay gathered from the forward to the end of the backward, which
is where the fused loss reads the LM heads. The frozen teacher is sharded the same way, without
an optimizer (its root stays gathered all run: it has no backward); the trained pair of online
KD is two roots, one per model. Gradients are reduce-scattered after every micro-batch (no
``no_sync``: the accumulated gradients stay sharded, at the cost of one reduce-scatter per
micro-batch).

Generation (validation, rollouts, teacher outputs, the final evaluation) runs on whole
parameters: every process gathers every unit (:func:`full_parameters`, collective), then the
main process may run forwards alone. Checkpoints hold the **gathered** state (model and
optimizer, full tensors on the CPU, written once by the main process, read by every process),
so a run can resume on another number of processes; the cost is a full copy of the state in the
main process's memory while it saves.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from kdexp.errors import UserError

# The fused loss replaces the LM head by the identity, so a model returns its final hidden
# states, a view; nothing changes them in place (the warning's concern).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def enabled(cfg: DictConfig) -> bool:
    return cfg.get("fsdp") is not None


def init_group(device: str) -> None:
    """A process group for ``fully_shard`` also in one process without a launcher (accelerate
    starts none for a single process); gloo on CPU, NCCL on GPUs."""
    if dist.is_initialized():
        return
    if "LOCAL_RANK" not in os.environ:
        from kdexp.engine import _free_port

        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def models_in(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost Hugging Face models in ``module`` (itself, or online KD's student and teacher)."""
    if getattr(module, "_no_split_modules", None):
        return [module]
    return [m for child in module.children() for m in models_in(child)]


def roots(*models: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The outermost sharded modules in ``models``."""
    from torch.distributed.fsdp import FSDPModule

    def walk(module: torch.nn.Module) -> list[torch.nn.Module]:
        if isinstance(module, FSDPModule):
            return [module]
        return [m for child in module.children() for m in walk(child)]

    return [r for model in models if model is not None for r in walk(model)]


def is_sharded(model: torch.nn.Module | None) -> bool:
    return model is not None and bool(roots(model))


def options(cfg: DictConfig) -> dict:
    """What :func:`shard` reads of the config."""
    return {"mixed_precision": cfg.train.mixed_precision, "reshard_after_forward": bool(cfg.fsdp.reshard_after_forward)}


def shard(module: torch.nn.Module, opts: dict, frozen: bool = False) -> torch.nn.Module:
    """Every Hugging Face model in ``module`` sharded in place across the processes: each decoder
    layer a unit, the model itself the root over the rest. (Online KD's pair holds two models:
    two roots, each gathered from its forward to its backward, as the fused loss needs.) Mixed
    precision (``train.mixed_precision=bf16``): layers gathered in bfloat16, gradients reduced in
    float32. Call before the optimizer is made: sharding replaces the parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    found = models_in(module)
    if not found or not all(units(m) for m in found):
        raise UserError(f"fsdp= shards a model by its decoder layers, and {type(module).__name__} names none "
                        f"(no _no_split_modules): train it without fsdp= (DDP or deepspeed=)")
    kwargs = {}
    if opts["mixed_precision"] == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    after = opts["reshard_after_forward"] or frozen  # a frozen model has no backward to wait for
    for model in found:
        for layer in units(model):
            fully_shard(layer, reshard_after_forward=after, **kwargs)
        # the root (embeddings, final norm, LM head) stays gathered after its forward: the
        # backward needs it at once, and the fused loss reads the head after the forward
        fully_shard(model, reshard_after_forward=False, **kwargs)
        model.kdexp_reshard = after  # what full_parameters puts back
        model.kdexp_fsdp = opts  # what shard_like copies
    return module


def shard_like(engine: torch.nn.Module, model: torch.nn.Module) -> bool:
    """``model`` (a frozen teacher) sharded as the trained ``engine`` is, if it is; whether it was."""
    found = roots(engine)
    if not found:
        return False
    shard(model, found[0].kdexp_fsdp, frozen=True)
    return True


@contextmanager
def full_parameters(*models: torch.nn.Module | None) -> Iterator[None]:
    """Every unit of the sharded ``models`` gathered while inside, and kept gathered across
    forwards, so that one process may generate alone (no forward inside asks the others for
    anything). Collective: every process enters. Models that are not sharded are skipped."""
    from torch.distributed.fsdp import FSDPModule

    found = [(root, [m for m in root.modules() if isinstance(m, FSDPModule)]) for root in roots(*models)]
    for _, modules in found:
        for module in modules:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for root, modules in found:
            for module in modules:
                module.reshard()
                if module is not root:  # a root stays gathered after its forward, as FSDP keeps it
                    module.set_reshard_after_forward(getattr(root, "kdexp_reshard", True), recurse=False)


def reshard(model: torch.nn.Module) -> None:
    """The roots of ``model`` back to their shards: a root stays gathered after a forward (the
    fused check, a generation), and its gathered parameters are not those the optimizer holds."""
    for root in roots(model):
        root.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered on the main process's CPU (empty elsewhere).
    Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardedState:
    """The sharded model and its optimizer as one checkpointed object (``state_dict`` gathers
    both whole on the main process, ``load_state_dict`` gives every process its shards from the
    whole state). Registered with accelerate for checkpointing, which writes it on the main
    process beside the RNG states, the scheduler and the loop's own state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        reshard(self.model)
        model, optimizer = get_state_dict(self.model, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        reshard(self.model)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (over sharded gradients it is a DTensor)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm
