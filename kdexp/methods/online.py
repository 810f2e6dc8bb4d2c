"""Online KD: a frozen teacher with a small trainable module, trained with the student.

Rao et al., "Exploring and Enhancing the Transfer of Distribution in Knowledge Distillation
for Autoregressive Language Models" (arXiv 2409.12512, 2024): the teacher's weights
stay fixed; an online module (LoRA on the attention's query and value projections by
default; prefix tuning and P-tuning in the ablations) is trained at the same time as the
student, on the same batch, with no sampling:

    L_s = D(teacher (detached), student)
    L_t = alpha * D(teacher, student (detached)) + (1 - alpha) * CE(teacher, references)

The loop trains both with one engine: :class:`Pair` holds the student and the teacher in one
module, one optimizer has a parameter group per side (each with its learning rate), and one
backward of ``L_s + L_t`` gives each side exactly its own gradient, because each loss sees
the other side detached (:mod:`kdexp.losses.objective`, ``trains: teacher``). The parameter
sets are disjoint, so this is the same update as two optimizers and two backward passes,
under DDP and DeepSpeed alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kdexp.errors import UserError

KINDS = ("lora", "prefix", "ptuning")


@dataclass(frozen=True)
class OnlineModule:
    """The teacher's trainable module: ``kind`` and its PEFT settings, and its learning rate."""

    kind: str = "lora"
    r: int = 32
    lora_alpha: float = 64.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: query and value of the architecture
    num_virtual_tokens: int = 16
    lr: float = 5e-4

    def peft_config(self):
        from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig

        if self.kind == "lora":
            return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.dropout,
                              task_type="CAUSAL_LM",
                              target_modules=list(self.target_modules) if self.target_modules else None)
        if self.kind == "prefix":
            return PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, task_type="CAUSAL_LM")
        return PromptEncoderConfig(num_virtual_tokens=self.num_virtual_tokens, task_type="CAUSAL_LM",
                                   encoder_hidden_size=max(self.r, 8))

    @property
    def virtual_tokens(self) -> int:
        """Positions P-tuning prepends to the teacher's logits (0 for LoRA and prefix tuning)."""
        return self.num_virtual_tokens if self.kind == "ptuning" else 0

    def attach(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """``teacher`` wrapped with a fresh module: only the module's parameters train.

        The base model stays in eval mode (its dropout off, as a fixed teacher's is); the
        module's own dropout (LoRA's) is active while training.
        """
        from peft import get_peft_model

        teacher.requires_grad_(False)
        try:
            model = get_peft_model(teacher, self.peft_config())
        except ValueError as err:
            raise UserError(f"method=okd: {err}; set method.target_modules=[...]") from None
        model.eval()
        for name, module in model.named_modules():
            if name.endswith("lora_dropout") or ".lora_dropout." in name:
                module.train()
        return model


class Pair(torch.nn.Module):
    """The student and the teacher with its online module, as one module for the engine.

    ``forward`` returns both models' logits for the same batch. Checkpoints hold the student
    and the teacher's trainable parameters only: the frozen teacher weights are the ones on
    disk and are left out (a 7B teacher would otherwise be copied into every checkpoint).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, virtual_tokens: int = 0):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.virtual_tokens = virtual_tokens  # P-tuning prepends them to the teacher's logits
        self._register_state_dict_hook(_drop_frozen_teacher)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_teacher)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        teacher = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return student, teacher[:, self.virtual_tokens:]

    def frozen_teacher_keys(self, prefix: str = "") -> set[str]:
        trainable = {n for n, p in self.teacher.named_parameters() if p.requires_grad}
        return {f"{prefix}teacher.{k}" for k in self.teacher.state_dict() if k not in trainable}


def _drop_frozen_teacher(module: Pair, state: dict, prefix: str, local_metadata: Any) -> None:
    for key in module.frozen_teacher_keys(prefix):
        state.pop(key, None)


def _allow_missing_frozen_teacher(module: Pair, incompatible: Any) -> None:
    frozen = module.frozen_teacher_keys()
    missing = [k for k in incompatible.missing_keys if k.removeprefix("module.") not in frozen]
    incompatible.missing_keys[:] = missing


def trainable_teacher_state(pair: Pair, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's entries of a full state dict of ``pair`` (keys relative to the teacher)."""
    return {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
