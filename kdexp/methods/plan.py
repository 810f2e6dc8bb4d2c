"""A method made concrete for one run: its objective, its source, its hooks, and the teacher's
online module when the teacher trains too (:func:`build`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from kdexp.config import teachers_rule
from kdexp.errors import UserError
from kdexp.losses.objective import Objective
from kdexp.methods import METHODS, TermSpec, rl  # noqa: F401  (rl registers its loss terms)
from kdexp.methods.online import OnlineModule
from kdexp.methods.sources import Source


@dataclass
class Plan:
    """The objective, the source of sequences, the hooks, and the online module (or none)."""

    objective: Objective
    source: Source
    hooks: list[Source] = field(default_factory=list)
    online: OnlineModule | None = None

    @property
    def components(self) -> list[Source]:
        return [self.source, *self.hooks]

    @property
    def needs_teacher(self) -> bool:
        return self.objective.needs_teacher or any(c.needs_teacher for c in self.components)


def build(cfg: DictConfig) -> Plan:
    """The plan of ``cfg``: objective, source and hooks (nothing is loaded yet)."""
    method = METHODS.get(cfg.method.name)
    objective = build_objective(cfg)
    online = method.make_online(cfg)
    if (online is not None) != objective.trains_teacher:
        raise UserError("an objective with terms that train the teacher needs method=okd's online module"
                        if online is None else "method=okd needs terms with trains: teacher")
    hooks = method.make_hooks(cfg, objective)
    if teachers_rule(cfg) == "mot":  # Merge-of-Thought: branches per teacher, merged (a hook of the loop)
        from kdexp.teachers.merge import MergeOfThought

        hooks.append(MergeOfThought(len(cfg.teachers.names or []) or 1, int(cfg.teachers.branch_steps or 1)))
    return Plan(objective, method.make_source(cfg), hooks, online)


def build_objective(cfg: DictConfig) -> Objective:
    """The objective of ``cfg``: the method's terms plus ``method.sample_weight``."""
    return Objective.from_spec(objective_spec(cfg), sample_weight=cfg.method.get("sample_weight", "none"),
                               min_weight=float(cfg.method.get("min_weight", 0.1)))


def objective_spec(cfg: DictConfig) -> list[TermSpec]:
    """The term list of ``cfg.method`` (or its explicit ``method.terms``)."""
    method = METHODS.get(cfg.method.name)
    if cfg.method.get("terms"):
        return [dict(t) for t in OmegaConf.to_container(cfg.method.terms, resolve=True)]
    return method.terms(cfg)
