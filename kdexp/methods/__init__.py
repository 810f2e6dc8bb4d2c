"""Methods: where training sequences come from, which weighted loss terms apply, and what
runs between steps.

A method is data, not a branch in the training loop. ``Method.terms(cfg)`` gives the
objective as a list of term specs (``[{loss: ce, weight: 0.5}, {loss: fkl, weight: 0.5}]``,
a term may be restricted to rows of one origin: ``rows: [teacher]``); ``Method.source(cfg)``
gives the :class:`~kdexp.methods.sources.Source` of its sequences (dataset, teacher outputs,
student outputs, a replay buffer, ...); ``Method.hooks(cfg, objective)`` gives schedules
that act after each step (TAID's ``t``). The loop asks the plan what it needs (teacher
logits, a teacher for rollouts); it never asks for a method's name. ``method.terms`` in a
config replaces a method's own list.

    kdexp train method=sft
    kdexp train method=gkd method.lmbda=1 loss.beta=0.9
    kdexp train method=kd 'method.terms=[{loss: ce, weight: 1}, {loss: fkl, weight: 1, temperature: 2}]'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdexp.errors import UserError
from kdexp.losses.objective import Objective
from kdexp.methods import rl, sources
from kdexp.methods.context import Context
from kdexp.methods.online import KINDS, OnlineModule, Pair
from kdexp.methods.sources import Source
from kdexp.registry import Registry
from kdexp.rollout import RolloutSpec

TermSpec = dict[str, Any]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    terms: Callable[[DictConfig], list[TermSpec]]
    source: Callable[[DictConfig], Source] = lambda cfg: Source()
    hooks: Callable[[DictConfig, Objective], list[Source]] = lambda cfg, objective: []
    online: Callable[[DictConfig], OnlineModule | None] = lambda cfg: None


@dataclass
class Plan:
    """A method made concrete for one run: its objective, its source, its hooks, and the
    teacher's online module when the teacher trains too."""

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


METHODS: Registry[Method] = Registry("method")


def param(cfg: DictConfig, key: str, check: Callable[[Any], bool], what: str) -> Any:
    """``cfg.method[key]``, or a one-line error naming the key, its range and the value."""
    value = cfg.method.get(key)
    if not check(value):
        raise UserError(f"method.{key} must be {what}, got {value!r} (method={cfg.method.name})")
    return value


def _unit(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def loss_term(cfg: DictConfig, weight: float, **extra: Any) -> TermSpec:
    """The ``loss=`` group as a term: its name plus its hyper-parameters."""
    params = OmegaConf.to_container(cfg.loss, resolve=True)
    return {"loss": params.pop("name"), "weight": weight, **params, **extra}


def kd_weight_terms(cfg: DictConfig) -> list[TermSpec]:
    """``(1 - w) * CE + w * KD`` with ``w = method.kd_weight``.

    ``kd_weight: adaptive`` is ``0.5 * CE + 0.5 * s * KD`` where ``s`` is the running ratio of
    the CE term's magnitude to the KD term's (KD losses are often 100-1000x smaller than the
    LM loss, and a fixed weight then does nothing).
    """
    if cfg.method.kd_weight == "adaptive":
        return [{"loss": "ce", "weight": 0.5}, {**loss_term(cfg, 0.5), "adaptive": True}]
    w = float(param(cfg, "kd_weight", _unit, "in [0, 1] or 'adaptive'"))
    return [{"loss": "ce", "weight": 1.0 - w}, loss_term(cfg, w)]


def rollout_spec(cfg: DictConfig, section: str = "rollout") -> RolloutSpec:
    return RolloutSpec.from_cfg(OmegaConf.to_container(cfg[section], resolve=True))


def teacher_outputs(cfg: DictConfig) -> sources.TeacherOutputs:
    mode = param(cfg, "teacher_outputs", lambda v: v in ("cached", "live"), "cached or live")
    return sources.TeacherOutputs(live=mode == "live")


def off_policy(cfg: DictConfig) -> Source:
    """The non-student side of a mixture: references, or teacher outputs with ``seq_kd``."""
    return teacher_outputs(cfg) if param(cfg, "seq_kd", lambda v: isinstance(v, bool), "true or false") \
        else Source()


METHODS.add("sft", Method(
    "sft", "supervised fine-tuning: cross-entropy on the dataset references",
    terms=lambda cfg: [{"loss": "ce", "weight": 1.0}]))

METHODS.add("kd", Method(
    "kd", "token-level KD on the dataset text (Hinton et al. 2015; Sanh et al. 2019): "
          "(1 - kd_weight) * CE + kd_weight * loss",
    terms=kd_weight_terms))

METHODS.add("seqkd", Method(
    "seqkd", "sequence-level KD (Kim & Rush, EMNLP 2016): CE on the teacher's outputs, generated "
             "once and cached (kd_weight > 0 adds word-level KD on them)",
    terms=kd_weight_terms, source=teacher_outputs))

METHODS.add("gkd", Method(
    "gkd", "generalized KD (Agarwal et al., ICLR 2024): with probability lmbda a micro-batch is "
           "student-generated, else dataset text (teacher outputs with seq_kd=true)",
    terms=kd_weight_terms,
    source=lambda cfg: sources.OnPolicy(
        sources.constant(param(cfg, "lmbda", _unit, "in [0, 1]")), off_policy(cfg))))

METHODS.add("imitkd", Method(
    "imitkd", "ImitKD (Lin et al., EMNLP 2020): each sequence is student-generated with "
              "probability 1 - beta, beta = beta_base^(-step/total) decaying from 1",
    terms=kd_weight_terms,
    source=lambda cfg: sources.OnPolicy(
        sources.exponential_decay(param(cfg, "beta_base", lambda v: _unit(1 / v) if v else False, ">= 1")),
        off_policy(cfg), per_sequence=True)))

METHODS.add("distillm", Method(
    "distillm", "DistiLLM (Ko et al., ICML 2024): skew KL with the adaptive off-policy scheduler "
                "and a replay buffer of student outputs",
    terms=kd_weight_terms,
    source=lambda cfg: sources.AdaptiveOffPolicy(
        param(cfg, "init_threshold", _unit, "in [0, 1]"),
        param(cfg, "loss_eps", lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0"),
        param(cfg, "capacity", _positive_int, "an integer > 0"),
        param(cfg, "replay_ratio", lambda v: v in sources.AdaptiveOffPolicy.RATIOS,
              "one of " + ", ".join(sources.AdaptiveOffPolicy.RATIOS)))))

METHODS.add("sgo", Method(
    "sgo", "student-generated outputs for every prompt, made before training and used "
           "exclusively, regenerated `refresh` times (Rang et al. 2025)",
    terms=kd_weight_terms,
    source=lambda cfg: sources.Pregenerated(param(cfg, "refresh", _nonneg_int, "an integer >= 0"))))


def minillm_terms(cfg: DictConfig) -> list[TermSpec]:
    """Policy gradient + single-step term on the rollouts, and the LM term on ``pt`` rows."""
    pg = {"loss": "minillm_pg", "weight": 1.0, "rows": ["student"], "clip": cfg.method.clip}
    terms = [pg, loss_term(cfg, 1.0, rows=["student"])]
    if cfg.method.get("pt_data"):
        lm, kd = float(cfg.method.lm_coef), float(param(cfg, "pt_kd_ratio", _unit, "in [0, 1]"))
        terms += [{"loss": "ce", "weight": lm * (1 - kd), "rows": ["pt"]},
                  {"loss": "fkl", "weight": lm * kd, "rows": ["pt"]}]
    return terms


METHODS.add("minillm", Method(
    "minillm", "MiniLLM (Gu et al., ICLR 2024): reverse-KL policy gradient with single-step "
               "decomposition, teacher-mixed sampling, length normalization and PPO clipping",
    terms=minillm_terms,
    source=lambda cfg: rl.RolloutStore(
        param(cfg, "num_rollouts", _positive_int, "an integer > 0"),
        param(cfg, "ppo_epochs", _positive_int, "an integer > 0"),
        param(cfg, "teacher_mix", _unit, "in [0, 1]"), cfg.method.get("pt_data"),
        gamma=float(param(cfg, "gamma", _unit, "in [0, 1]")),
        reward_scaling=float(param(cfg, "reward_scaling", lambda v: isinstance(v, (int, float)) and v > 0, "> 0")))))


def distillm2_terms(cfg: DictConfig) -> list[TermSpec]:
    """``(2 - beta) * SKL`` on the teacher's responses + ``beta * SRKL`` on the student's."""
    beta = float(param(cfg, "beta", lambda v: isinstance(v, (int, float)) and 0 <= v <= 2, "in [0, 2]"))
    alpha = cfg.method.skew_alpha
    return [{"loss": "skl", "weight": 2 - beta, "alpha": alpha, "rows": ["teacher"]},
            {"loss": "srkl", "weight": beta, "alpha": alpha, "rows": ["student"]}]


METHODS.add("distillm2", Method(
    "distillm2", "DistiLLM-2 (Ko et al., ICML 2025): skew KL on teacher responses plus skew "
                 "reverse KL on student responses to the same prompts",
    terms=distillm2_terms,
    source=lambda cfg: sources.Contrastive(rollout_spec(cfg), live=bool(cfg.method.get("live")))))


def taid_terms(cfg: DictConfig) -> list[TermSpec]:
    if cfg.loss.name != "taid":
        raise UserError(f"method=taid schedules the t of loss=taid; got loss={cfg.loss.name}")
    spec = {**loss_term(cfg, 1.0), "loss": "taid_ce", "t": cfg.method.t_start}
    spec.pop("t2_scale", None)
    return [spec]


def taid_hooks(cfg: DictConfig, objective: Objective) -> list[Source]:
    term = next(t for t, k in zip(objective.terms, objective.keys, strict=True) if t.name == "taid_ce")
    key = objective.keys[objective.terms.index(term)]
    return [rl.TaidSchedule(term.fn.divergence, key, float(cfg.method.t_start), float(cfg.method.t_end),
                            float(cfg.method.alpha), float(cfg.method.beta))]


METHODS.add("taid", Method(
    "taid", "TAID (Shing et al., ICLR 2025): KL to an interpolation of student and teacher whose "
            "t rises from t_start to t_end, adaptively",
    terms=taid_terms, hooks=taid_hooks))


def gkd_rl_terms(cfg: DictConfig) -> list[TermSpec]:
    alpha = float(param(cfg, "alpha", _unit, "in [0, 1]"))
    if cfg.train.micro_batch_size < 2:
        raise UserError("method=gkd_rl's baseline is the mean reward of the other sequences of a "
                        "micro-batch: set train.micro_batch_size >= 2")
    return [{"loss": "reinforce", "weight": 1 - alpha, "rows": ["student"]},
            loss_term(cfg, alpha, rows=["student"])]


METHODS.add("gkd_rl", Method(
    "gkd_rl", "GKD + RL (Agarwal et al., ICLR 2024, Sec. 5): (1 - alpha) * REINFORCE on a "
              "reward - alpha * divergence, on student samples",
    terms=gkd_rl_terms, source=lambda cfg: rl.Rewarded(cfg.method.reward)))


def okd_terms(cfg: DictConfig) -> list[TermSpec]:
    """``D(teacher detached, student)`` for the student; ``alpha * D(teacher, student detached)
    + (1 - alpha) * CE(teacher)`` for the teacher's module (Rao et al., arXiv 2409.12512, 2024)."""
    alpha = float(param(cfg, "alpha", _unit, "in [0, 1]"))
    return [loss_term(cfg, 1.0), loss_term(cfg, alpha, trains="teacher"),
            {"loss": "ce", "weight": 1.0 - alpha, "trains": "teacher"}]


def okd_module(cfg: DictConfig) -> OnlineModule:
    m = cfg.method
    targets = m.get("target_modules")
    return OnlineModule(
        kind=param(cfg, "module", lambda v: v in KINDS, "one of " + ", ".join(KINDS)),
        r=param(cfg, "r", _positive_int, "an integer > 0"),
        lora_alpha=float(param(cfg, "lora_alpha", lambda v: isinstance(v, (int, float)) and v > 0, "> 0")),
        dropout=float(param(cfg, "dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)")),
        target_modules=tuple(targets) if targets else None,
        num_virtual_tokens=param(cfg, "num_virtual_tokens", _positive_int, "an integer > 0"),
        lr=float(param(cfg, "teacher_lr", lambda v: isinstance(v, (int, float)) and v > 0, "> 0")))


METHODS.add("okd", Method(
    "okd", "online KD (Rao et al. 2024): a trainable module on the frozen teacher (LoRA on query "
           "and value; prefix or P-tuning) adapts to the student, trained on the same batches",
    terms=okd_terms, online=okd_module))


def build(cfg: DictConfig) -> Plan:
    """The plan of ``cfg``: objective, source and hooks (nothing is loaded yet)."""
    method = METHODS.get(cfg.method.name)
    objective = build_objective(cfg)
    online = method.online(cfg)
    if (online is not None) != objective.trains_teacher:
        raise UserError("an objective with terms that train the teacher needs method=okd's online module"
                        if online is None else "method=okd needs terms with trains: teacher")
    return Plan(objective, method.source(cfg), method.hooks(cfg, objective), online)


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


__all__ = ["METHODS", "Context", "Method", "Pair", "Plan", "build", "build_objective", "objective_spec"]
