"""A teacher model in this process: frozen (``teacher.source=live``), or trained with the
student through an online module (OKD)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from kdexp import engine as engines
from kdexp import fsdp
from kdexp.losses.fused import Head
from kdexp.methods.online import OnlineModule, Pair
from kdexp.teachers.base import Logits, Teacher, bare_heads, linear_head, logits_of

log = logging.getLogger(__name__)


class LiveTeacher(Teacher):
    """A frozen model on this process's device, run on every micro-batch that needs it.

    Under ZeRO-3 and FSDP2 it is partitioned across the processes like the student
    (:func:`kdexp.engine.shard_frozen`) once the engine is prepared.
    """

    kind = "live"
    evaluated_as_loaded = True

    def __init__(self, accelerator, vocab: int | None, model: torch.nn.Module):
        super().__init__(accelerator, vocab)
        self.module = model.requires_grad_(False).eval().to(accelerator.device)

    def prepared(self, engine: torch.nn.Module) -> torch.nn.Module:
        how = "ZeRO-3" if engines.zero_stage(self.accelerator) == 3 else "FSDP2" if fsdp.is_sharded(engine) else None
        if how:
            self.module = engines.shard_frozen(self.accelerator, self.module, engine)
            if self.accelerator.is_main_process:
                log.info("the teacher is partitioned across the %d processes (%s)",
                         self.accelerator.num_processes, how)
        return engine

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        with torch.no_grad(), self.accelerator.autocast() if autocast else nullcontext():
            return logits_of(self.module, batch, self.vocab)

    def fusable(self, engine: torch.nn.Module) -> str:
        self._teacher_head, why = linear_head(self.module)
        return super().fusable(engine) or (f"the teacher: {why}" if why else "")

    def fused_distributions(self, batch: dict[str, torch.Tensor]) -> Head:
        head = self._teacher_head
        with torch.no_grad(), self.accelerator.autocast(), bare_heads(head):
            hidden = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return Head(hidden, head.weight, head.bias, self.vocab)

    @contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        with engines.plain_model(self.accelerator, self.module) as plain:
            yield plain

    def gathered(self) -> list[torch.nn.Module]:
        return [self.module]

    def evaluated(self) -> torch.nn.Module | None:
        return self.accelerator.unwrap_model(self.module)


class OnlineTeacher(Teacher):
    """Online KD (Rao et al., arXiv 2409.12512, 2024): the frozen teacher with a trainable
    module (:class:`kdexp.methods.online.OnlineModule`), trained with the student.

    The engine trains a :class:`~kdexp.methods.online.Pair` of both, one parameter group each,
    and one forward of the pair gives both logits, so DDP and DeepSpeed see one model. At the
    end the module is saved as a PEFT adapter in ``final_teacher_adapter/`` (the base model
    is untouched).
    """

    kind = "online"
    student_part = "student"

    def __init__(self, accelerator, vocab: int | None, model: torch.nn.Module, online: OnlineModule):
        super().__init__(accelerator, vocab)
        self.online = online
        self.module = online.attach(model).to(accelerator.device)
        self.engine: torch.nn.Module | None = None

    def engine_module(self, student: torch.nn.Module) -> torch.nn.Module:
        return Pair(student, self.module, self.online.virtual_tokens)

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        return [([p for p in self.module.parameters() if p.requires_grad], self.online.lr)]

    def prepared(self, engine: torch.nn.Module) -> torch.nn.Module:
        self.engine = engine
        return self.accelerator.unwrap_model(engine).student

    def forward(self, engine: torch.nn.Module, batch: dict[str, torch.Tensor],
                wanted: bool) -> tuple[Logits, Logits | None]:
        """Both models, both with gradients, from one forward of the engine."""
        student, teacher = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.vocab is not None:
            student, teacher = student[..., :self.vocab], teacher[..., :self.vocab]
        return student, teacher

    def fusable(self, engine: torch.nn.Module) -> str:
        pair = self.accelerator.unwrap_model(engine)
        self._head, why = linear_head(pair.student)
        self._teacher_head, teacher_why = linear_head(self.module)
        return why or (f"the teacher: {teacher_why}" if teacher_why else "")

    def forward_fused(self, engine: torch.nn.Module, batch: dict[str, torch.Tensor],
                      wanted: bool) -> tuple[Head, Head]:
        """Both models' hidden states from one forward of the engine, the teacher's with the
        gradient its own terms send to its online module."""
        with bare_heads(self._head, self._teacher_head):
            student, teacher = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return (Head(student, self._head.weight, self._head.bias, self.vocab),
                Head(teacher, self._teacher_head.weight, self._teacher_head.bias, self.vocab))

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        with torch.no_grad(), self.accelerator.autocast() if autocast else nullcontext():
            logits = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, self.online.virtual_tokens:]
        return logits if self.vocab is None else logits[..., :self.vocab]

    @contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        with engines.plain_model(self.accelerator, self.module, self.engine) as plain:
            yield plain

    def save(self, engine: torch.nn.Module, run_dir: Path) -> None:
        from kdexp.finish import part_of

        module, state = part_of(self.accelerator, engine, "teacher")
        if self.accelerator.is_main_process:
            module.save_pretrained(run_dir / "final_teacher_adapter", state_dict=state)
        self.accelerator.wait_for_everyone()

    def gathered(self) -> list[torch.nn.Module]:
        return [self.module]

    def evaluated(self) -> torch.nn.Module | None:
        return self.accelerator.unwrap_model(self.module)
