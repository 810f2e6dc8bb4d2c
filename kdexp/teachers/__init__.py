"""The teacher side: one :class:`Teacher` per run, whatever the teacher is.

    kdexp train method=kd                                   # live: a frozen model
    kdexp train method=okd                                  # online: trained with the student
    kdexp cache-teacher teacher.top_k=64 && kdexp train teacher.source=cache   # a top-k cache
    kdexp train teacher.source=server teacher.url=http://127.0.0.1:8000         # a served teacher

:func:`build` picks the kind from ``teacher.source`` (:data:`SOURCES`) and the method's plan;
the loop only calls the :class:`Teacher` interface (:mod:`kdexp.teachers.base`). A new kind
(an inference server, several teachers, a teacher with another tokenizer) is a subclass and an
entry in :data:`SOURCES`; see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from kdexp.models import load_model, shared_vocab
from kdexp.registry import Registry
from kdexp.teachers.base import Teacher
from kdexp.teachers.cache import CachedTeacher
from kdexp.teachers.live import LiveTeacher, OnlineTeacher
from kdexp.teachers.server import ServerTeacher

Builder = Callable[..., Teacher]
SOURCES: Registry[Builder] = Registry("teacher source")


def wanted(cfg: DictConfig, plan) -> bool:
    """Whether the run needs a teacher: for its loss or its data, or for the final evaluation."""
    return plan.needs_teacher or bool(cfg.eval.teacher and cfg.teacher.get("name_or_path"))


@SOURCES.register("live")
def live(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """The teacher model loaded here: frozen, or with the method's online module (OKD)."""
    if not wanted(cfg, plan):
        return Teacher(accelerator)
    model, teacher_tokenizer = load_model(cfg.teacher, "teacher", inputs.teacher_tokenizer)
    vocab = shared_vocab(student, tokenizer, model, teacher_tokenizer,
                         (cfg.student.name_or_path, cfg.teacher.name_or_path))
    if plan.online is not None:
        return OnlineTeacher(accelerator, vocab, model, plan.online)
    return LiveTeacher(accelerator, vocab, model)


@SOURCES.register("cache")
def cache(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """The top-k cache opened (and checked) by the run's input checks."""
    return CachedTeacher(accelerator, inputs.cache, student, tokenizer)


@SOURCES.register("server")
def server(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """A teacher behind an inference server (vLLM, kdexp serve-teacher), connected and checked
    by the run's input checks."""
    return ServerTeacher(accelerator, inputs.server, int(cfg.teacher.top_k), student, tokenizer,
                         int(cfg.teacher.concurrency))


def build(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """The run's teacher (:class:`Teacher` itself when it needs none), after the student was
    loaded. ``inputs``: what the input checks opened (teacher tokenizer, cache)."""
    return SOURCES.get(cfg.teacher.source)(cfg, plan, accelerator, student, tokenizer, inputs)


__all__ = ["SOURCES", "CachedTeacher", "LiveTeacher", "OnlineTeacher", "ServerTeacher", "Teacher", "build",
           "wanted"]
