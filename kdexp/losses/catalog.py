"""Every divergence's record: its one-line description and its declared parameters.

This module imports no torch: the command line checks ``loss=`` and ``loss.*`` from these
records before anything heavy is loaded. The implementations
(:mod:`kdexp.losses.divergences`) register against these names, and registration fails if a
function's keyword parameters differ from its record, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdexp.params import Param, between, boolean, number, positive, positive_int, unit


@dataclass(frozen=True)
class Declared:
    description: str
    params: tuple[Param, ...] = ()


# Accepted by every divergence (``temperature`` is also a keyword of every function).
GENERIC = (
    Param("temperature", positive, "> 0", "softmax temperature of both models inside the divergence"),
    Param("chunk_size", lambda v: v in (None, "auto") or positive_int(v), "a positive integer, auto or null",
          "positions per chunk of the divergence, recomputed in the backward pass (null: all at once)"),
)
# Keys of the ``loss`` group that are options of the term, not of the divergence.
TERM_OPTIONS = (
    Param("t2_scale", boolean, "true or false", "multiply the term's weight by temperature^2 (Hinton et al.)"),
    Param("fused", lambda v: str(v).lower() in ("auto", "true", "false"), "auto, true or false",
          "compute the loss from hidden states and LM heads a chunk at a time (auto: wherever possible)"),
    Param("cross_tokenizer", lambda v: v in (None, "uld", "span"), "uld, span or null",
          "a teacher with another tokenizer: uld (sorted distributions) or span (aligned text, hybrid)"),
    Param("matched_weight", lambda v: v is None or (isinstance(v, (int, float)) and 0 <= v <= 1), "in [0, 1] or null",
          "span: the weight of the divergence on the tokens both vocabularies hold (null: their share)"),
)


def _skew(role: str) -> Param:
    return Param("alpha", between(0, 1, high_open=True), "in [0, 1)", f"the {role}'s share of the skewed mixture")


DECLARED: dict[str, Declared] = {
    "fkl": Declared("forward KL(p || q): mean seeking (Hinton et al., 2015)"),
    "rkl": Declared("reverse KL(q || p): mode seeking (Gu et al., ICLR 2024)"),
    "jsd": Declared("generalized JSD(beta) of GKD; beta=0 fkl, beta=1 rkl", (
        Param("beta", unit, "in [0, 1]", "weight of the teacher in the mixture: 0 is fkl, 1 is rkl"),)),
    "tvd": Declared("total variation distance 0.5 * sum |p - q|"),
    "skl": Declared("skew KL(p || alpha p + (1-alpha) q) of DistiLLM", (_skew("teacher"),)),
    "srkl": Declared("skew reverse KL(q || alpha q + (1-alpha) p) of DistiLLM", (_skew("student"),)),
    "akl": Declared("adaptive KL: fkl and rkl weighted by head/tail gaps", (
        Param("mu", between(0, 1, low_open=True), "in (0, 1]", "cumulative teacher mass that makes the head"),)),
    "ab": Declared("alpha-beta divergence of ABKD; (1,0) fkl, (0,1) rkl", (
        Param("alpha", number, "a finite number", "exponent on the teacher: hardness of the matching"),
        Param("beta", number, "a finite number", "exponent on the student: confidence concentration"))),
    "alpha": Declared("Amari alpha-divergence; alpha=1 fkl, alpha=0 rkl", (
        Param("alpha", number, "a finite number", "1 is fkl, 0 is rkl, 0.5 twice the squared Hellinger"),)),
    "taid": Declared("TAID: KL(p_t || q), p_t interpolates q and p by t", (
        Param("t", unit, "in [0, 1]", "interpolation from the student (0) to the teacher (1)"),)),
    "amid": Declared("AMiD: base divergence between p and an alpha-mixture of p, q", (
        Param("alpha", number, "a finite number", "mixture family: -1 arithmetic, 1 geometric"),
        Param("lam", unit, "in [0, 1]", "the teacher's weight in the mixture"),
        Param("base", lambda v: v in DECLARED and v != "amid",
              "a divergence other than amid: ab, akl, alpha, fkl, jsd, rkl, skl, srkl, taid or tvd",
              "the divergence between the teacher and the mixture"))),
}


def names() -> list[str]:
    """The divergences, the choices of ``loss=``."""
    return sorted(DECLARED)


def params(name: str) -> dict[str, Param]:
    """The parameters ``name`` accepts: its own and the generic ones."""
    return {p.name: p for p in (*GENERIC, *DECLARED[name].params)}


def problems(name: str, values: dict, prefix: str = "loss.") -> list[str]:
    """The problems of ``values`` for divergence ``name`` (unknown keys, values out of range)."""
    from kdexp.errors import did_you_mean

    accepted = params(name)
    out = []
    for key, value in values.items():
        if key not in accepted:
            out.append(f"loss '{name}' has no parameter '{key}';{did_you_mean(key, accepted)} "
                       f"parameters: {', '.join(accepted)}")
        elif (problem := accepted[key].problem(value, f"{prefix}{key}")) is not None:
            out.append(problem)
    return out


__all__ = ["DECLARED", "GENERIC", "TERM_OPTIONS", "Declared", "names", "params", "problems"]
