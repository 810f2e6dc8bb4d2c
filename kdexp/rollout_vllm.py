"""Student rollouts from a colocated vLLM engine (``rollout.engine=vllm``, GPUs only).

    kdexp train method=gkd rollout.engine=vllm rollout.sync_every=1      # pip install 'kdexp[vllm]'

On-policy methods spend most of their time generating; vLLM generates several times faster than
a Hugging Face decode loop. Each training process runs its own engine on its GPU, beside the
trained model (``rollout.vllm.gpu_memory_utilization`` of its memory), made once from the student
as it is when the first rollout is asked for; every ``rollout.sync_every`` optimizer steps the
student's current weights are loaded into it (gathered whole first under ZeRO-3 and FSDP2).

The engine only picks the tokens: the same temperature, top-p, top-k, stop tokens and length as
the HF sampler (:class:`kdexp.rollout.RolloutSpec`), one seed per prompt from the rollout's own
seed. The log-probabilities that methods use (importance weights, policy-gradient ratios) are then
computed by the trained model in one teacher-forced forward (:func:`kdexp.rollout.score`), so
they are the trainer's, not the engine's. Samples are not those of the HF sampler (another random
generator), and repeatable only as far as vLLM's kernels are batch-invariant.

What stays on the HF sampler: teacher outputs, MiniLLM's teacher-mixed sampling and rollouts the
teacher scores as they are sampled (they need both models at every token).

**Untested against a real vLLM engine**: no GPU with vLLM was available where kdexp is developed;
the tests exercise everything around the engine (the sampling parameters, the scoring, the sync
schedule) with a stand-in that has vLLM's interface. ``make gpu-check`` runs the real check where
vLLM is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from kdexp.rollout import RolloutSpec, Sampled, score

log = logging.getLogger(__name__)


def problems(cfg: DictConfig) -> list[str]:
    """Why ``rollout.engine`` cannot run here, as one line each (nothing when it can)."""
    r = cfg.rollout
    engine = r.get("engine", "hf")
    if engine not in ("hf", "vllm"):
        return [f"rollout.engine={engine} is not one of hf, vllm"]
    out = []
    if not isinstance(r.get("sync_every"), int) or r.sync_every < 1:
        out.append(f"rollout.sync_every must be an integer >= 1 (optimizer steps between weight loads), "
                   f"got {r.get('sync_every')}")
    if engine == "hf":
        return out
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        out.append("rollout.engine=vllm generates on GPUs, and this run has none: use rollout.engine=hf "
                   "(kdexp's own sampler)")
    elif importlib.util.find_spec("vllm") is None:
        out.append("rollout.engine=vllm needs vLLM: pip install 'kdexp[vllm]', or use rollout.engine=hf")
    if cfg.get("fsdp") is not None:
        out.append("rollout.engine=vllm with fsdp= is not supported yet (the engine needs the student's whole "
                   "weights on every process): use DDP, deepspeed=, or rollout.engine=hf")
    if cfg.student.get("lora", {}).get("enabled"):
        out.append("rollout.engine=vllm loads whole weights into the engine, not LoRA adapters: "
                   "use rollout.engine=hf with student.lora.enabled=true")
    return out


def sampling_params(spec: RolloutSpec, stops: Sequence[int], seed: int, vocab: int | None) -> dict[str, Any]:
    """vLLM's ``SamplingParams`` arguments for one prompt: the HF sampler's decoding, token ids
    only. Greedy is temperature 0; top-k off is -1; tokens beyond the compared vocabulary (a
    model's padding rows) are never sampled, as the HF sampler cuts them."""
    out: dict[str, Any] = {"n": 1, "max_tokens": int(spec.max_new_tokens), "seed": int(seed) % (2**63),
                           "stop_token_ids": sorted({int(t) for t in stops}), "detokenize": False,
                           "temperature": float(spec.temperature) if spec.do_sample else 0.0,
                           "top_p": float(spec.top_p) if spec.do_sample else 1.0,
                           "top_k": int(spec.top_k) if spec.do_sample and spec.top_k else -1,
                           "skip_special_tokens": False, "ignore_eos": False}
    if vocab is not None:
        out["allowed_token_ids"] = list(range(vocab))
    return out


class VllmRollouts:
    """A colocated vLLM engine that samples the student's rollouts (one per process)."""

    def __init__(self, cfg: DictConfig, tokenizer, vocab: int | None):
        self.cfg, self.tokenizer, self.vocab = cfg, tokenizer, vocab
        self.every = int(cfg.rollout.sync_every)
        self.llm: Any = None
        self.synced_at: int | None = None  # the optimizer step whose weights the engine holds
        self.syncs = 0

    def _start(self, student: torch.nn.Module) -> None:
        """The engine, made from the student as it is now (written to a temporary directory)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights load in place
        import random

        import numpy as np
        from vllm import LLM

        options = dict(self.cfg.rollout.vllm)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        states = random.getstate(), np.random.get_state()
        # vLLM seeds every generator of the process when its worker starts: the run's are kept
        with tempfile.TemporaryDirectory(prefix="kdexp-vllm-") as path, torch.random.fork_rng(
                devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            student.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            self.llm = LLM(model=path, seed=int(self.cfg.seed), dtype=options.get("dtype", "auto"),
                           gpu_memory_utilization=float(options.get("gpu_memory_utilization", 0.3)),
                           enforce_eager=bool(options.get("enforce_eager", False)),
                           max_model_len=int(self.cfg.data.max_length),
                           # the stop tokens are the rollout's, not generation_config.json's
                           generation_config="vllm",
                           # several training processes: one engine each, on its own GPU
                           distributed_executor_backend="external_launcher" if world > 1 else None)
        random.setstate(states[0])
        np.random.set_state(states[1])

    def due(self, step: int) -> bool:
        """Whether the engine's weights are older than ``rollout.sync_every`` steps at ``step``."""
        return self.synced_at is None or step - self.synced_at >= self.every

    def sync(self, student: torch.nn.Module, step: int) -> None:
        """The student's current weights into the engine, if due at optimizer step ``step``.
        ``student``: the plain model, its parameters whole (inside ``full_parameters``)."""
        if self.llm is None:
            self._start(student)
        elif self.due(step):
            from transformers.modeling_utils import revert_weight_conversion

            # the checkpoint's names (models that fuse weights when loaded name them otherwise in memory)
            state = revert_weight_conversion(student, {k: v.detach() for k, v in student.state_dict().items()})
            weights = list(state.items())
            self.llm.apply_model(lambda model: model.load_weights(weights=weights))  # in this process: no copy
            self.llm.reset_prefix_cache()  # cached prompts were computed with the old weights
            self.syncs += 1
        else:
            return
        self.synced_at = step

    def sample(self, student: torch.nn.Module, prompts: Sequence[list[int]], spec: RolloutSpec, seed: int,
               step: int) -> list[Sampled]:
        """One response per prompt, as :func:`kdexp.rollout.sample` returns them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync(student, step)
        stops = [self.tokenizer.eos_token_id, *spec.stop_ids]
        params = [SamplingParams(**sampling_params(spec, stops, seed + i, self.vocab)) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        return score(student, prompts, responses, spec, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                     self.vocab)
