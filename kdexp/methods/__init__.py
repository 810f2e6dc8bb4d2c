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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from kdexp.errors import UserError
from kdexp.params import (
    Param,
    anything,
    at_least,
    between,
    boolean,
    nonneg,
    nonneg_int,
    one_of,
    optional,
    positive,
    positive_int,
    unit,
)
from kdexp.registry import Registry

if TYPE_CHECKING:
    from kdexp.losses.objective import Objective
    from kdexp.methods.online import OnlineModule
    from kdexp.methods.sources import Source

TermSpec = dict[str, Any]

# What a run's ``method`` section accepts whatever the method (conf/config.yaml).
COMMON = (
    Param("kd_weight", lambda v: v == "adaptive" or unit(v), "in [0, 1] or 'adaptive'",
          "(1 - w) * CE + w * KD for the methods that mix them; adaptive: scaled to the CE term"),
    Param("sample_weight", one_of("none", "teacher_likelihood", "student_likelihood"),
          "one of none, teacher_likelihood, student_likelihood", "per-sequence weights (WSGO)"),
    Param("min_weight", between(0, 1, low_open=True), "in (0, 1]", "lower clamp of those weights"),
    Param("terms", anything, "a list of terms", "an explicit term list replaces the method's own"),
    Param("seq_kd", boolean, "true or false", "mixtures: the off-policy side is teacher outputs"),
    Param("teacher_outputs", one_of("cached", "live"), "cached or live",
          "teacher outputs generated once and cached, or sampled per batch"),
)


@dataclass(frozen=True)
class Method:
    """A method's record: its name, what it is, its declared parameters (beside :data:`COMMON`),
    and how it is made concrete for a run. ``terms``, ``source``, ``hooks`` and ``online`` are
    called on a config whose parameters were checked against ``params``; they import what they
    build, so that reading the records (and checking a config) imports no torch."""

    name: str
    description: str
    terms: Callable[[DictConfig], list[TermSpec]]
    params: tuple[Param, ...] = ()
    source: Callable[[DictConfig], Source] | None = None
    hooks: Callable[[DictConfig, Objective], list[Source]] | None = None
    online: Callable[[DictConfig], OnlineModule | None] | None = None

    def declared(self) -> dict[str, Param]:
        return {p.name: p for p in (*COMMON, *self.params)}

    def problems(self, cfg: DictConfig) -> list[str]:
        """The method's parameters in ``cfg.method`` that its declarations refuse."""
        out = []
        for key, p in self.declared().items():
            value = cfg.method.get(key)
            if key in cfg.method and not (value is None and p in COMMON):
                problem = p.problem(value, f"method.{key}", f" (method={self.name})")
                if problem:
                    out.append(problem)
        return out

    def make_source(self, cfg: DictConfig) -> Source:
        if self.source is None:
            from kdexp.methods.sources import Source

            return Source()
        return self.source(cfg)

    def make_hooks(self, cfg: DictConfig, objective: Objective) -> list[Source]:
        return [] if self.hooks is None else self.hooks(cfg, objective)

    def make_online(self, cfg: DictConfig) -> OnlineModule | None:
        return None if self.online is None else self.online(cfg)


METHODS: Registry[Method] = Registry("method")


def param(cfg: DictConfig, key: str) -> Any:
    """``cfg.method[key]``, checked against the method's declaration (one line if refused)."""
    method = METHODS.get(cfg.method.name)
    problem = method.declared()[key].problem(cfg.method.get(key), f"method.{key}", f" (method={method.name})")
    if problem:
        raise UserError(problem)
    return cfg.method.get(key)


def names_list(v: Any) -> bool:
    """A list of strings (an empty one means the default, as null does)."""
    return not isinstance(v, (str, bytes, int, float, bool)) and all(isinstance(x, str) for x in v)


def loss_term(cfg: DictConfig, weight: float, **extra: Any) -> TermSpec:
    """The ``loss=`` group as a term: its name plus its hyper-parameters."""
    params = OmegaConf.to_container(cfg.loss, resolve=True)
    for option in ("cross_tokenizer", "matched_weight"):  # off: not part of the term
        if params.get(option) is None:
            params.pop(option, None)
    return {"loss": params.pop("name"), "weight": weight, **params, **extra}


def kd_weight_terms(cfg: DictConfig) -> list[TermSpec]:
    """``(1 - w) * CE + w * KD`` with ``w = method.kd_weight``.

    ``kd_weight: adaptive`` is ``0.5 * CE + 0.5 * s * KD`` where ``s`` is the running ratio of
    the CE term's magnitude to the KD term's (KD losses are often 100-1000x smaller than the
    LM loss, and a fixed weight then does nothing).
    """
    if cfg.method.kd_weight == "adaptive":
        return [{"loss": "ce", "weight": 0.5}, {**loss_term(cfg, 0.5), "adaptive": True}]
    w = float(param(cfg, "kd_weight"))
    return [{"loss": "ce", "weight": 1.0 - w}, loss_term(cfg, w)]


def rollout_spec(cfg: DictConfig, section: str = "rollout"):
    from kdexp.rollout import RolloutSpec

    return RolloutSpec.from_cfg(OmegaConf.to_container(cfg[section], resolve=True))


def teacher_outputs(cfg: DictConfig) -> Source:
    from kdexp.methods import sources

    return sources.TeacherOutputs(live=param(cfg, "teacher_outputs") == "live")


def off_policy(cfg: DictConfig) -> Source:
    """The non-student side of a mixture: references, or teacher outputs with ``seq_kd``."""
    from kdexp.methods import sources

    return teacher_outputs(cfg) if param(cfg, "seq_kd") else sources.Source()


def on_policy(cfg: DictConfig) -> Source:
    from kdexp.methods import sources

    return sources.OnPolicy(sources.constant(param(cfg, "lmbda")), off_policy(cfg))


def imitation(cfg: DictConfig) -> Source:
    from kdexp.methods import sources

    return sources.OnPolicy(sources.exponential_decay(param(cfg, "beta_base")), off_policy(cfg), per_sequence=True)


def adaptive_off_policy(cfg: DictConfig) -> Source:
    from kdexp.methods import sources

    return sources.AdaptiveOffPolicy(param(cfg, "init_threshold"), param(cfg, "loss_eps"),
                                     param(cfg, "capacity"), param(cfg, "replay_ratio"))


def pregenerated(cfg: DictConfig) -> Source:
    from kdexp.methods import sources

    return sources.Pregenerated(param(cfg, "refresh"))


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
    terms=kd_weight_terms, source=on_policy,
    params=(Param("lmbda", unit, "in [0, 1]", "probability that a micro-batch is student-generated"),)))

METHODS.add("imitkd", Method(
    "imitkd", "ImitKD (Lin et al., EMNLP 2020): each sequence is student-generated with "
              "probability 1 - beta, beta = beta_base^(-step/total) decaying from 1",
    terms=kd_weight_terms, source=imitation,
    params=(Param("beta_base", at_least(1), ">= 1",
                  "beta = beta_base^(-step/total): the off-policy share decays from 1 to 1/beta_base"),)))

METHODS.add("distillm", Method(
    "distillm", "DistiLLM (Ko et al., ICML 2024): skew KL with the adaptive off-policy scheduler "
                "and a replay buffer of student outputs",
    terms=kd_weight_terms, source=adaptive_off_policy,
    params=(Param("init_threshold", unit, "in [0, 1]", "starting probability of student-generated batches"),
            Param("loss_eps", nonneg, ">= 0", "validation-loss rise that raises that probability"),
            Param("capacity", positive_int, "an integer > 0", "sequences the replay buffer holds"),
            Param("replay_ratio", one_of("decreasing", "increasing", "constant"),
                  "one of decreasing, increasing, constant", "share of replayed student sequences"))))

METHODS.add("sgo", Method(
    "sgo", "student-generated outputs for every prompt, made before training and used "
           "exclusively, regenerated `refresh` times (Rang et al. 2025)",
    terms=kd_weight_terms, source=pregenerated,
    params=(Param("refresh", nonneg_int, "an integer >= 0", "times the outputs are regenerated"),)))


def minillm_terms(cfg: DictConfig) -> list[TermSpec]:
    """Policy gradient + single-step term on the rollouts, and the LM term on ``pt`` rows."""
    pg = {"loss": "minillm_pg", "weight": 1.0, "rows": ["student"], "clip": param(cfg, "clip")}
    terms = [pg, loss_term(cfg, 1.0, rows=["student"])]
    if cfg.method.get("pt_data"):
        lm, kd = float(param(cfg, "lm_coef")), float(param(cfg, "pt_kd_ratio"))
        terms += [{"loss": "ce", "weight": lm * (1 - kd), "rows": ["pt"]},
                  {"loss": "fkl", "weight": lm * kd, "rows": ["pt"]}]
    return terms


def rollout_store(cfg: DictConfig) -> Source:
    from kdexp.methods import rl

    return rl.RolloutStore(param(cfg, "num_rollouts"), param(cfg, "ppo_epochs"), param(cfg, "teacher_mix"),
                           cfg.method.get("pt_data"), gamma=float(param(cfg, "gamma")),
                           reward_scaling=float(param(cfg, "reward_scaling")))


METHODS.add("minillm", Method(
    "minillm", "MiniLLM (Gu et al., ICLR 2024): reverse-KL policy gradient with single-step "
               "decomposition, teacher-mixed sampling, length normalization and PPO clipping",
    terms=minillm_terms, source=rollout_store,
    params=(Param("teacher_mix", unit, "in [0, 1]", "the teacher's share of the sampling distribution"),
            Param("num_rollouts", positive_int, "an integer > 0", "rollouts per refill of the store"),
            Param("ppo_epochs", positive_int, "an integer > 0", "passes over each store"),
            Param("clip", between(0, 1, low_open=True, high_open=True), "in (0, 1)",
                  "PPO clipping of the importance ratio to 1 +- clip"),
            Param("gamma", unit, "in [0, 1]", "discount of the long-term reward"),
            Param("reward_scaling", positive, "> 0", "the reward's scale"),
            Param("pt_data", anything, "a data preset or null", "pre-training rows mixed into each batch"),
            Param("lm_coef", nonneg, ">= 0", "weight of the language-modelling terms on those rows"),
            Param("pt_kd_ratio", unit, "in [0, 1]", "share of forward KL in that LM term"))))


def distillm2_terms(cfg: DictConfig) -> list[TermSpec]:
    """``(2 - beta) * SKL`` on the teacher's responses + ``beta * SRKL`` on the student's."""
    beta, alpha = float(param(cfg, "beta")), param(cfg, "skew_alpha")
    return [{"loss": "skl", "weight": 2 - beta, "alpha": alpha, "rows": ["teacher"]},
            {"loss": "srkl", "weight": beta, "alpha": alpha, "rows": ["student"]}]


def contrastive(cfg: DictConfig) -> Source:
    from kdexp.methods import sources

    return sources.Contrastive(rollout_spec(cfg), live=param(cfg, "live"))


METHODS.add("distillm2", Method(
    "distillm2", "DistiLLM-2 (Ko et al., ICML 2025): skew KL on teacher responses plus skew "
                 "reverse KL on student responses to the same prompts",
    terms=distillm2_terms, source=contrastive,
    params=(Param("beta", between(0, 2), "in [0, 2]", "weight of the student side; 2 - beta the teacher side"),
            Param("skew_alpha", between(0, 1, high_open=True), "in [0, 1)", "skew of both divergences"),
            Param("live", boolean, "true or false", "sample both sides per batch instead of once per epoch"))))


def taid_terms(cfg: DictConfig) -> list[TermSpec]:
    if cfg.loss.name != "taid":
        raise UserError(f"method=taid schedules the t of loss=taid; got loss={cfg.loss.name}")
    spec = {**loss_term(cfg, 1.0), "loss": "taid_ce", "t": param(cfg, "t_start")}
    spec.pop("t2_scale", None)
    return [spec]


def taid_hooks(cfg: DictConfig, objective: Objective) -> list[Source]:
    from kdexp.methods import rl

    term = next(t for t, k in zip(objective.terms, objective.keys, strict=True) if t.name == "taid_ce")
    key = objective.keys[objective.terms.index(term)]
    return [rl.TaidSchedule(term.fn.divergence, key, float(param(cfg, "t_start")), float(param(cfg, "t_end")),
                            float(param(cfg, "alpha")), float(param(cfg, "beta")))]


METHODS.add("taid", Method(
    "taid", "TAID (Shing et al., ICLR 2025): KL to an interpolation of student and teacher whose "
            "t rises from t_start to t_end, adaptively",
    terms=taid_terms, hooks=taid_hooks,
    params=(Param("t_start", unit, "in [0, 1]", "the interpolation's t at the first step"),
            Param("t_end", unit, "in [0, 1]", "its largest value"),
            Param("alpha", nonneg, ">= 0", "step size of the adaptive update"),
            Param("beta", unit, "in [0, 1]", "momentum of the relative improvement"))))


def gkd_rl_terms(cfg: DictConfig) -> list[TermSpec]:
    alpha = float(param(cfg, "alpha"))
    if cfg.train.micro_batch_size < 2:
        raise UserError("method=gkd_rl's baseline is the mean reward of the other sequences of a "
                        "micro-batch: set train.micro_batch_size >= 2")
    return [{"loss": "reinforce", "weight": 1 - alpha, "rows": ["student"]},
            loss_term(cfg, alpha, rows=["student"])]


def rewarded(cfg: DictConfig) -> Source:
    from kdexp.methods import rl

    return rl.Rewarded(param(cfg, "reward"))


METHODS.add("gkd_rl", Method(
    "gkd_rl", "GKD + RL (Agarwal et al., ICLR 2024, Sec. 5): (1 - alpha) * REINFORCE on a "
              "reward - alpha * divergence, on student samples",
    terms=gkd_rl_terms, source=rewarded,
    params=(Param("alpha", unit, "in [0, 1]", "weight of the divergence; 1 - alpha the REINFORCE term's"),
            Param("reward", one_of("rougeL", "exact_match", "teacher_loglik"),
                  "one of rougeL, exact_match, teacher_loglik", "the sequence-level reward"))))


def okd_terms(cfg: DictConfig) -> list[TermSpec]:
    """``D(teacher detached, student)`` for the student; ``alpha * D(teacher, student detached)
    + (1 - alpha) * CE(teacher)`` for the teacher's module (Rao et al., arXiv 2409.12512, 2024)."""
    alpha = float(param(cfg, "alpha"))
    return [loss_term(cfg, 1.0), loss_term(cfg, alpha, trains="teacher"),
            {"loss": "ce", "weight": 1.0 - alpha, "trains": "teacher"}]


def okd_module(cfg: DictConfig) -> OnlineModule:
    from kdexp.methods.online import OnlineModule

    targets = param(cfg, "target_modules")
    return OnlineModule(
        kind=param(cfg, "module"), r=param(cfg, "r"), lora_alpha=float(param(cfg, "lora_alpha")),
        dropout=float(param(cfg, "dropout")), target_modules=tuple(targets) if targets else None,
        num_virtual_tokens=param(cfg, "num_virtual_tokens"), lr=float(param(cfg, "teacher_lr")))


METHODS.add("okd", Method(
    "okd", "online KD (Rao et al. 2024): a trainable module on the frozen teacher (LoRA on query "
           "and value; prefix or P-tuning) adapts to the student, trained on the same batches",
    terms=okd_terms, online=okd_module,
    params=(Param("alpha", unit, "in [0, 1]", "the teacher's divergence weight; 1 - alpha its CE's"),
            Param("module", one_of("lora", "prefix", "ptuning"), "one of lora, prefix, ptuning",
                  "the teacher's trainable module"),
            Param("r", positive_int, "an integer > 0", "LoRA rank (ptuning: the encoder's hidden size)"),
            Param("lora_alpha", positive, "> 0", "LoRA scaling = lora_alpha / r"),
            Param("dropout", between(0, 1, high_open=True), "in [0, 1)", "LoRA dropout"),
            Param("target_modules", optional(names_list), "a list of module names or null",
                  "null: the query and value projections of the architecture"),
            Param("num_virtual_tokens", positive_int, "an integer > 0", "prefix / ptuning length"),
            Param("teacher_lr", positive, "> 0", "the module's learning rate"))))


_LAZY = {"Plan": "plan", "build": "plan", "build_objective": "plan", "objective_spec": "plan",
         "Context": "context", "Pair": "online", "Source": "sources"}


def __getattr__(name: str) -> Any:
    """The run-time side (plans, contexts, sources), imported on first use: it needs torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"kdexp.methods.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kdexp.methods' has no attribute {name!r}")


__all__ = ["COMMON", "METHODS", "Method", "Param", "build", "build_objective", "objective_spec", "param"]
