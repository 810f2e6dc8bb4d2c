"""The teacher side: one :class:`Teacher` per run, whatever the teacher is.

    kdexp train method=kd                                   # live: a frozen model
    kdexp train method=okd                                  # online: trained with the student
    kdexp cache-teacher teacher.top_k=64 && kdexp train teacher.source=cache   # a top-k cache
    kdexp train teacher.source=server teacher.url=http://127.0.0.1:8000         # a served teacher
    kdexp train teachers.rule=mixture teachers.names=[tiny,tiny]                # several, combined

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

from kdexp.config import teachers_rule
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


def student_width(student: torch.nn.Module, tokenizer) -> int | None:
    """The student's logits compared with a teacher of another tokenizer: its tokenizer's tokens
    (padded embedding rows cut)."""
    from kdexp.models import logit_width, vocab_rows

    return logit_width(vocab_rows(student), vocab_rows(student), len(tokenizer), "student")


@SOURCES.register("live")
def live(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """The teacher model loaded here: frozen, or with the method's online module (OKD)."""
    if not wanted(cfg, plan):
        return Teacher(accelerator)
    model, teacher_tokenizer = load_model(cfg.teacher, "teacher", inputs.teacher_tokenizer)
    if cfg.loss.get("cross_tokenizer"):  # compared through text, not token by token
        from kdexp.teachers.cross import CrossTeacher

        return CrossTeacher(accelerator, student_width(student, tokenizer), model, tokenizer, teacher_tokenizer,
                            str(cfg.loss.cross_tokenizer))
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
    if cfg.loss.get("cross_tokenizer"):  # another tokenizer: teacher= names it, the server scores its tokens
        from kdexp.teachers.cross import ServedCrossTeacher

        return ServedCrossTeacher(accelerator, student_width(student, tokenizer), inputs.server,
                                  int(cfg.teacher.top_k), tokenizer, inputs.teacher_tokenizer,
                                  str(cfg.loss.cross_tokenizer), int(cfg.teacher.concurrency))
    draws = None
    if cfg.teacher.get("sparse", "topk") == "sampled":  # n draws at the loss temperature, seeded
        from kdexp.teacher_cache import temperature_of

        draws = {"n": int(cfg.teacher.samples), "temperature": temperature_of(plan.objective.teacher_temperatures),
                 "seed": int(cfg.teacher.sample_seed)}
    return ServerTeacher(accelerator, inputs.server, int(cfg.teacher.top_k), student, tokenizer,
                         int(cfg.teacher.concurrency), draws)


# A named teacher's spec starts from these, not from the run's teacher= (whose revision, dtype or
# attention kernel belong to that model).
MODEL_DEFAULTS = {"name_or_path": None, "init": "pretrained", "dtype": "float32", "revision": None,
                  "trust_remote_code": False, "attn_implementation": None,
                  "lora": {"enabled": False, "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None}}


def preset(name: str) -> DictConfig:
    """The model spec of ``NAME``: the ``teacher=NAME`` preset (``conf/teacher/NAME.yaml``) or
    a model directory (a run's ``final/``), its weights loaded as they are."""
    from omegaconf import OmegaConf

    from kdexp.config import conf_dir

    path = conf_dir() / "teacher" / f"{name}.yaml"
    spec = OmegaConf.load(path) if path.is_file() else {"name_or_path": name}
    return OmegaConf.merge(OmegaConf.create(MODEL_DEFAULTS), spec)


def several(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """``teachers.rule``: the teachers of ``teachers.names`` (frozen models, servers or caches), combined by the rule."""
    import copy

    from kdexp.teachers.multi import MultiTeacher

    t = cfg.teachers
    models, widths = [], []
    known = inputs.named_tokenizers or {}  # read by the input checks
    servers, caches = inputs.named_servers or {}, inputs.named_caches or {}
    for name in map(str, t.names):
        teacher_tokenizer = None
        if name in servers:  # connected by the input checks; built as the one served teacher is
            member = server(cfg, plan, accelerator, student, tokenizer, inputs._replace(server=servers[name]))
        elif name in caches:  # opened by the input checks; built as the one cached teacher is
            member = cache(cfg, plan, accelerator, student, tokenizer, inputs._replace(cache=caches[name]))
        else:
            member, teacher_tokenizer = load_model(preset(name), "teacher", known.get(name))
        widths.append(member.vocab if isinstance(member, Teacher) else shared_vocab(
            student, tokenizer, member, teacher_tokenizer, (cfg.student.name_or_path, f"teachers.names: {name}")))
        models.append(member)
    vocab = len(tokenizer) if any(w is not None for w in widths) else None
    raw = None
    if t.rule == "relative":  # the raw student: a model of its own, or this student before training
        if t.get("raw_student"):
            raw, raw_tokenizer = load_model(preset(str(t.raw_student)), "student", known.get(str(t.raw_student)))
            shared_vocab(student, tokenizer, raw, raw_tokenizer, (cfg.student.name_or_path, "teachers.raw_student"))
        else:
            raw = copy.deepcopy(accelerator.unwrap_model(student))
    route = {"key": t.route_key, "map": {str(k): str(v) for k, v in (t.route_map or {}).items()},
             "default": None if t.get("route_default") is None else str(t.route_default)}
    return MultiTeacher(accelerator, vocab, list(t.names), models, t.rule, t.get("weights"), float(t.alpha), raw,
                        route)


def build(cfg: DictConfig, plan, accelerator, student: torch.nn.Module, tokenizer, inputs: Any) -> Teacher:
    """The run's teacher (:class:`Teacher` itself when it needs none), after the student was
    loaded. ``inputs``: what the input checks opened (teacher tokenizer, cache)."""
    if teachers_rule(cfg) and plan.needs_teacher:
        return several(cfg, plan, accelerator, student, tokenizer, inputs)
    return SOURCES.get(cfg.teacher.source)(cfg, plan, accelerator, student, tokenizer, inputs)


__all__ = ["MODEL_DEFAULTS", "SOURCES", "CachedTeacher", "LiveTeacher", "OnlineTeacher", "ServerTeacher", "Teacher", "build",
           "wanted"]
