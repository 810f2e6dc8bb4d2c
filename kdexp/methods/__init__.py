"""Methods: where training sequences come from, and which weighted loss terms apply.

A method is data, not a branch in the training loop: ``terms(cfg)`` gives the objective as a
list of term specs (``[{loss: ce, weight: 0.5}, {loss: fkl, weight: 0.5, temperature: 1}]``)
and ``source`` says where sequences come from. The loop asks the objective whether it needs
teacher logits; it never asks for a method's name. ``method.terms`` in a config replaces a
method's own list, for objectives no preset covers.

    kdexp train method=sft
    kdexp train method=kd loss=rkl method.kd_weight=0.9
    kdexp train method=kd 'method.terms=[{loss: ce, weight: 1}, {loss: fkl, weight: 1, temperature: 2}]'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdexp.errors import UserError
from kdexp.losses.objective import Objective
from kdexp.registry import Registry

TermSpec = dict[str, Any]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    terms: Callable[[DictConfig], list[TermSpec]]
    source: str = "dataset"  # where sequences come from; later methods add teacher / student / mix


METHODS: Registry[Method] = Registry("method")


def loss_term(cfg: DictConfig, weight: float) -> TermSpec:
    """The ``loss=`` group as a term: its name plus its hyper-parameters."""
    params = OmegaConf.to_container(cfg.loss, resolve=True)
    return {"loss": params.pop("name"), "weight": weight, **params}


def kd_weight_terms(cfg: DictConfig) -> list[TermSpec]:
    """``(1 - w) * CE + w * KD`` with ``w = method.kd_weight``.

    ``kd_weight: adaptive`` is ``0.5 * CE + 0.5 * s * KD`` where ``s`` is the running ratio of
    the CE term's magnitude to the KD term's (KD losses are often 100-1000x smaller than the
    LM loss, and a fixed weight then does nothing).
    """
    if cfg.method.kd_weight == "adaptive":
        return [{"loss": "ce", "weight": 0.5}, {**loss_term(cfg, 0.5), "adaptive": True}]
    w = float(cfg.method.kd_weight)
    if not 0.0 <= w <= 1.0:
        raise UserError(f"method.kd_weight must be in [0, 1] or 'adaptive', got {w}")
    return [{"loss": "ce", "weight": 1.0 - w}, loss_term(cfg, w)]


METHODS.add("sft", Method(
    "sft", "supervised fine-tuning: cross-entropy on the dataset references",
    terms=lambda cfg: [{"loss": "ce", "weight": 1.0}]))
METHODS.add("kd", Method(
    "kd", "token-level KD on the dataset text (Hinton et al. 2015; Sanh et al. 2019): "
          "(1 - kd_weight) * CE + kd_weight * loss",
    terms=kd_weight_terms))


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
