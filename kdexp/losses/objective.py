"""An objective is a weighted list of terms, reduced once by the global number of valid tokens.

    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5},
                                     {"loss": "fkl", "weight": 0.5, "temperature": 2.0}])
    loss, parts = objective(student_logits, teacher_logits, targets, num_tokens)

``num_tokens`` is the count of valid target positions over *every* micro-batch of the
optimizer step and every process, so that the sum of the micro-batch losses is exactly the
token mean of the full batch, whatever the accumulation and the padding (the fix for the
per-micro-batch-mean bias, e.g. TRL issue 4719).

Two options act on the terms, never inside a divergence:

* ``adaptive: true`` on a term multiplies its weight by the running ratio of the CE term's
  magnitude to its own (an exponential moving average over optimizer steps, updated by
  :meth:`Objective.update` with values reduced over all processes, so every rank uses the
  same scale). ``method.kd_weight=adaptive`` is ``0.5 * CE + 0.5 * scale * KD``.
* ``trains: teacher`` on a term makes it a loss of the teacher's trainable module (online KD):
  ``ce`` is then the teacher's cross-entropy on the targets and a divergence is computed with
  the *student* detached, so its gradient reaches the teacher only. Every other term sees the
  teacher's logits detached, so the student's losses never move the teacher. The two sides
  add up into one loss whose single backward gives each side exactly its own gradient.
* ``sample_weight``: every sequence's per-position losses are multiplied by its per-token
  geometric-mean probability under the teacher (``teacher_likelihood``) or the student
  (``student_likelihood``), detached, clamped below at ``min_weight`` and normalized to mean
  1 over the sequences of the whole optimizer step (every micro-batch, every process): the
  sample-wise weighting of student-generated outputs. A micro-batch only knows its own
  weights, so it is computed with the raw weights, and the step divides by their mean once
  all micro-batches are in (:meth:`Objective.normalize_step`): the loss is linear in that
  factor, so scaling the accumulated gradients by it is exact, and the step's value and
  gradient do not depend on how the batch is split across micro-batches and processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kdexp import losses
from kdexp.errors import UserError
from kdexp.losses import fused
from kdexp.losses.sampled import Sampled, estimator
from kdexp.losses.sampled import problems as sampled_problems
from kdexp.registry import Registry

IGNORE_INDEX = -100
ORIGINS = ("data", "teacher", "student", "pt")  # where a sequence's response came from
TRAINEES = ("student", "teacher")  # whose parameters a term's gradient reaches
FUSED = ("auto", "true", "false")  # loss.fused

# (student_logits [B, T, V], teacher_logits [B, T, V] or None, batch) -> per-position values [B, T]
TermFn = Callable[[torch.Tensor, "torch.Tensor | None", Mapping[str, torch.Tensor]], torch.Tensor]

# Terms other than ce and the divergences (policy-gradient surrogates, ...), registered by the
# methods that define them: name -> builder(params) -> (fn, needs_teacher).
TERMS: Registry[Callable[..., tuple[TermFn, bool]]] = Registry("loss term")


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of ``targets`` (0 where ignored), in float32.

    student_logits [B, T, V], targets [B, T] (already shifted: ``targets[:, t]`` is the token
    that follows position t, or ``IGNORE_INDEX``) -> [B, T].
    """
    flat = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                           targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(targets.shape)


SAMPLE_WEIGHTS = ("none", "teacher_likelihood", "student_likelihood")
# The two extra entries of a micro-batch's values under sample weights: the sum of its raw
# sequence weights and the number of sequences they cover (see Objective.normalize_step).
WEIGHT_SUM, WEIGHT_ROWS = "sample_weight_sum", "sample_weight_rows"


@dataclass(frozen=True)
class Term:
    """One weighted term: ``fn(student_logits, teacher_logits, batch) -> [B, T]``, averaged
    over the valid positions of the rows whose origin is in ``rows`` (every row when None).
    ``fn`` sees the other rows' targets as ``IGNORE_INDEX``.
    """

    name: str
    weight: float
    fn: TermFn
    needs_teacher: bool
    adaptive: bool = False
    rows: tuple[str, ...] | None = None
    trains: str = "student"
    temperature: float | None = None  # at which it reads the teacher's logits (None: it does not)
    # ce or divergence: a function of each position's logits alone, which the fused path can
    # compute a chunk of positions at a time; term: anything else (policy gradients, ...).
    kind: str = "term"
    fused: str = "auto"  # loss.fused: auto | true | false
    chunk_size: int | str | None = "auto"  # positions per chunk of the fused path (loss.chunk_size)
    cross: str | None = None  # loss.cross_tokenizer: compares a teacher with another tokenizer (uld, span)
    # A divergence's unbiased estimate from a teacher given by draws (kdexp.losses.sampled),
    # (student_logits, Sampled) -> [B, T]; None where it has none.
    sampled: Callable | None = None


def make_term(spec: Mapping[str, object]) -> Term:
    """A term from its config: ``{loss: ce | <divergence>, weight: w, t2_scale: bool, **params}``.

    ``t2_scale`` multiplies the weight by ``temperature ** 2``, the gradient-magnitude
    correction of Hinton et al. (2015, Sec. 2); off by default. ``adaptive`` (off by default)
    rescales the term to the CE term's running magnitude (see the module docstring).
    """
    spec = dict(spec)
    fused = str(spec.pop("fused", "auto")).lower()
    if fused not in FUSED:
        raise UserError(f"loss.fused must be auto, true or false, got '{fused}'")
    cross, matched_weight = spec.pop("cross_tokenizer", None), spec.pop("matched_weight", None)
    path = {"fused": fused, "chunk_size": spec.get("chunk_size", "auto")}
    params = {k: v for k, v in spec.items() if k not in ("loss", "weight", "t2_scale", "adaptive", "rows", "trains")}
    name = str(spec.get("loss"))
    term = replace(_make_term(spec), **path)
    if cross is None or term.kind != "divergence" or term.trains != "student":
        return term
    from kdexp.losses.cross import cross_term

    return cross_term(term, name, cross, params, matched_weight)


def _make_term(spec: dict) -> Term:
    name = str(spec.pop("loss"))
    weight = float(spec.pop("weight", 1.0))
    t2_scale = bool(spec.pop("t2_scale", False))
    adaptive = bool(spec.pop("adaptive", False))
    rows = spec.pop("rows", None)
    trains = str(spec.pop("trains", "student"))
    if trains not in TRAINEES:
        raise UserError(f"term '{name}': trains must be student or teacher, got '{trains}'")
    if rows is not None:
        rows = tuple(rows)
        for r in rows:
            if r not in ORIGINS:
                raise UserError(f"term '{name}': rows must be among {', '.join(ORIGINS)}, got '{r}'")
    if trains == "teacher":
        if adaptive:
            raise UserError(f"term '{name}': adaptive scales the student's terms, not the teacher's")
        return _teacher_term(name, weight, spec, t2_scale, rows)
    if name == "ce":
        if spec or adaptive:
            raise UserError(f"the ce term takes no parameters, got {sorted(spec) + ['adaptive'] * adaptive}")
        return Term("ce", weight, lambda s, t, b: cross_entropy(s, b["targets"]), needs_teacher=False,
                    rows=rows, kind="ce")
    temperature = float(spec.get("temperature", 1.0))
    if name in TERMS:
        fn, needs_teacher = TERMS.get(name)(**spec)
        return Term(name, weight, fn, needs_teacher=needs_teacher, adaptive=adaptive, rows=rows,
                    temperature=temperature if needs_teacher else None)
    div = losses.divergence(name, **spec)
    if t2_scale:
        weight *= temperature ** 2
    return Term(name, weight, lambda s, t, b: div(s, t, b["targets"] != IGNORE_INDEX), needs_teacher=True,
                adaptive=adaptive, rows=rows, temperature=temperature, kind="divergence",
                sampled=estimator(name, spec))


def _teacher_term(name: str, weight: float, spec: dict, t2_scale: bool, rows) -> Term:
    """A loss of the teacher's online module: its CE, or a divergence with the student detached."""
    if name == "ce":
        if spec:
            raise UserError(f"the ce term takes no parameters, got {sorted(spec)}")
        fn = lambda s, t, b: cross_entropy(t, b["targets"])  # noqa: E731
    elif name in losses.names():
        div = losses.divergence(name, **spec)
        weight *= float(spec.get("temperature", 1.0)) ** 2 if t2_scale else 1.0
        fn = lambda s, t, b: div(s.detach(), t, b["targets"] != IGNORE_INDEX)  # noqa: E731
    else:
        raise UserError(f"term '{name}' cannot train the teacher: only ce and the divergences can")
    return Term(f"teacher_{name}", weight, fn, needs_teacher=True, rows=rows, trains="teacher",
                kind="ce" if name == "ce" else "divergence")


def sequence_weights(logits: torch.Tensor, targets: torch.Tensor, min_weight: float) -> torch.Tensor:
    """Raw per-sequence weights from a model's likelihood of the targets. [B, T, V] x [B, T] -> [B]

    The weight is ``exp(mean log prob)`` over the sequence's valid positions (its per-token
    geometric-mean probability), clamped below at ``min_weight``; a sequence without a valid
    position gets 0. They are not normalized: the objective divides them by their mean over
    the whole optimizer step (:meth:`Objective.normalize_step`).
    """
    with torch.no_grad():
        mask = targets != IGNORE_INDEX
        count = mask.sum(-1)
        mean_logp = -(cross_entropy(logits, targets) * mask).sum(-1) / count.clamp_min(1)
        return mean_logp.exp().clamp_min(min_weight) * (count > 0)


class Objective:
    """Sum of weighted terms, masked by ``targets != IGNORE_INDEX`` and divided by ``num_tokens``."""

    EMA_MOMENTUM = 0.9          # adaptive terms: moving average over optimizer steps
    SCALE_RANGE = (1e-4, 1e4)   # and the bounds of their scale

    def __init__(self, terms: Sequence[Term], sample_weight: str = "none", min_weight: float = 0.1):
        if not terms:
            raise UserError("the objective has no terms with a non-zero weight")
        if sample_weight not in SAMPLE_WEIGHTS:
            raise UserError(f"sample_weight must be one of {', '.join(SAMPLE_WEIGHTS)}, got '{sample_weight}'")
        if not 0 < min_weight <= 1:
            raise UserError(f"min_weight must be in (0, 1], got {min_weight}")
        self.terms = list(terms)
        self.sample_weight, self.min_weight = sample_weight, float(min_weight)
        names = [t.name for t in self.terms]
        # Two terms of the same loss (say fkl at two temperatures) get distinct log keys.
        self.keys = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        if any(t.adaptive for t in self.terms) and "ce" not in names:
            raise UserError("an adaptive term is scaled to the ce term's magnitude: add a ce term")
        self.ema: dict[str, float] = {}

    @classmethod
    def from_spec(cls, spec: Sequence[Mapping[str, object]], sample_weight: str = "none",
                  min_weight: float = 0.1) -> Objective:
        terms = [make_term(s) for s in spec]
        return cls([t for t in terms if t.weight != 0], sample_weight, min_weight)

    @property
    def trains_teacher(self) -> bool:
        return any(t.trains == "teacher" for t in self.terms)

    @property
    def needs_teacher(self) -> bool:
        return (any(t.needs_teacher for t in self.terms)
                or self.sample_weight == "teacher_likelihood")

    @property
    def teacher_temperatures(self) -> set[float]:
        """The temperatures at which the objective reads the teacher's logits (its divergences',
        and 1 for the teacher's likelihood of ``sample_weight``): a stored approximation of the
        teacher is exact for one of them only."""
        out = {t.temperature for t in self.terms if t.needs_teacher and t.temperature is not None}
        return out | ({1.0} if self.sample_weight == "teacher_likelihood" else set())

    def scale(self, key: str) -> float:
        """The current multiplier of an adaptive term (1 before the first update)."""
        ce_key = self.keys[[t.name for t in self.terms].index("ce")]
        if key not in self.ema or self.ema[key] <= 0:
            return 1.0
        lo, hi = self.SCALE_RANGE
        return min(max(self.ema[ce_key] / self.ema[key], lo), hi)

    def weights(self) -> dict[str, float]:
        """The effective weight of every term now (adaptive scales included)."""
        return {key: term.weight * (self.scale(key) if term.adaptive else 1.0)
                for key, term in zip(self.keys, self.terms, strict=True)}

    def update(self, step_values: Mapping[str, float]) -> None:
        """Feed one optimizer step's term values (token means over all processes)."""
        if not any(t.adaptive for t in self.terms):
            return
        m = self.EMA_MOMENTUM
        for key in self.keys:
            value = step_values[key]
            self.ema[key] = value if key not in self.ema else m * self.ema[key] + (1 - m) * value

    def normalize_step(self, step_values: dict[str, float]) -> float:
        """Divide the step's term values by the step's mean sample weight, in place; the factor
        to multiply the step's accumulated gradients by (1.0 without sample weights).

        ``step_values`` are the micro-batches' values summed over the step and averaged over
        the processes (the same reduction as the terms'), so ``WEIGHT_SUM / WEIGHT_ROWS`` is
        the mean raw weight over every sequence of the step. Its two entries are replaced by
        ``sample_weight_mean``, logged with the terms.
        """
        if self.sample_weight == "none":
            return 1.0
        total, rows = step_values.pop(WEIGHT_SUM), step_values.pop(WEIGHT_ROWS)
        mean = total / rows if rows > 0 and total > 0 else 1.0
        for key in self.keys:
            step_values[key] /= mean
        step_values["sample_weight_mean"] = mean
        return 1.0 / mean

    def state_dict(self) -> dict[str, object]:
        return {"ema": dict(self.ema)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.ema = dict(state["ema"])

    def token_counts(self, batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Valid target positions of each term in one micro-batch (its rows only)."""
        return {key: int(self._mask(term, batch).sum())
                for key, term in zip(self.keys, self.terms, strict=True)}

    @staticmethod
    def _mask(term: Term, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["targets"] != IGNORE_INDEX  # [B, T]
        if term.rows is not None:
            codes = [ORIGINS.index(r) for r in term.rows]
            mask = mask & torch.isin(batch["origin"], torch.tensor(codes, device=mask.device))[:, None]
        return mask

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 batch: Mapping[str, torch.Tensor], num_tokens: Mapping[str, float] | float,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-term values) for one micro-batch.

        student_logits / teacher_logits [B, T, V]; ``batch`` holds ``targets`` [B, T] (and, for
        terms restricted to some rows, ``origin`` [B]). ``num_tokens`` is each term's count of
        valid positions over the whole step (a number when every term covers every row). Each
        returned value is the micro-batch's share of the term's token mean over the whole step,
        so summing them over the micro-batches (and processes) gives the step's mean. Under
        sample weights the loss and the values use the raw weights, and the values carry two
        more entries that :meth:`normalize_step` turns into the step's normalization.
        """
        targets = batch["targets"]
        seq_w = None
        parts: dict[str, torch.Tensor] = {}
        if self.sample_weight != "none":
            source = teacher_logits if self.sample_weight == "teacher_likelihood" else student_logits
            raw = sequence_weights(source, targets, self.min_weight)  # [B]
            parts[WEIGHT_SUM] = raw.sum()
            parts[WEIGHT_ROWS] = (targets != IGNORE_INDEX).any(-1).sum().float()
            seq_w = raw[:, None]  # [B, 1]
        total, values = self._terms(student_logits, teacher_logits, batch, num_tokens, seq_w, self.weights())
        return total, {**parts, **values}

    def _terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
               batch: Mapping[str, torch.Tensor], num_tokens: Mapping[str, float] | float,
               seq_w: torch.Tensor | None, weights: Mapping[str, float],
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the terms and their values on ``[B, T, V]`` logits."""
        targets = batch["targets"]
        parts: dict[str, torch.Tensor] = {}
        # The student's terms see a fixed teacher (a no-op unless the teacher is being trained).
        fixed_teacher = teacher_logits.detach() if teacher_logits is not None else None
        total = student_logits.new_zeros((), dtype=torch.float32)
        for key, term in zip(self.keys, self.terms, strict=True):
            mask = self._mask(term, batch)
            count = num_tokens[key] if isinstance(num_tokens, Mapping) else num_tokens
            if not mask.any():
                parts[key] = total.new_zeros(()).detach()
                continue
            teacher = teacher_logits if term.trains == "teacher" else fixed_teacher
            # A term restricted to some rows sees the others without targets, so that every
            # statistic it computes over its valid positions (means, whitening, ...) is over
            # its own rows only, not just its final sum (and a divergence skips those rows).
            own = batch if term.rows is None else {**batch, "targets": torch.where(mask, targets, IGNORE_INDEX)}
            if isinstance(teacher, Sampled) and term.needs_teacher:  # a teacher given by draws: the estimate
                if term.sampled is None:
                    raise UserError(sampled_problems([term.name])[0])
                per_position = term.sampled(student_logits, teacher)
            else:
                per_position = term.fn(student_logits, teacher, own)  # [B, T]
            if seq_w is not None:
                per_position = per_position * seq_w
            value = torch.where(mask, per_position, 0.0).sum() / max(count, 1)
            parts[key] = value.detach()
            total = total + weights[key] * value
        return total, parts

    # -- the fused path -------------------------------------------------------------------------

    @property
    def fused_mode(self) -> str:
        """``loss.fused`` over the terms: false if any term says false, true if any says true."""
        modes = {t.fused for t in self.terms}
        return "false" if "false" in modes else "true" if "true" in modes else "auto"

    @property
    def fused_chunk(self) -> int | str:
        """Positions per chunk of the fused path: the smallest ``chunk_size`` a term sets (the
        ``ce`` term of ``kd_weight`` takes none, the divergence beside it carries
        ``loss.chunk_size``), else ``auto``."""
        sizes = [t.chunk_size for t in self.terms if isinstance(t.chunk_size, int) and not isinstance(t.chunk_size, bool)]
        return min(sizes) if sizes else "auto"

    @property
    def fusable(self) -> bool:
        """Whether every term is CE or a divergence, functions of each position's logits alone,
        so that the fused path (:mod:`kdexp.losses.fused`) can compute them chunk by chunk."""
        return all(t.kind in ("ce", "divergence") for t in self.terms)

    def fused(self, student: fused.Logits, teacher: fused.Logits | None, batch: Mapping[str, torch.Tensor],
              num_tokens: Mapping[str, float] | float, grad_scale: float = 1.0,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`__call__` from hidden states and heads (:class:`kdexp.losses.fused.Head`),
        or a cache's sparse teacher: the same loss, values and gradients, a chunk of target
        positions at a time, never holding either model's ``[B, T, V]`` logits.

        Only the valid target positions are computed. Each chunk is a batch of ``n`` one-token
        rows (targets ``[n, 1]``, each position's row origin), which every CE and divergence
        term reads as it reads ``[B, T]``; sample weights are computed first, in a pass without
        gradients, from the per-position log-likelihoods summed per sequence. ``grad_scale``:
        fp16's loss scale (:func:`kdexp.losses.fused.fused_loss`).
        """
        targets = batch["targets"]
        width = targets.shape[1]
        index = (targets != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
        rows = {"targets": targets.reshape(-1).index_select(0, index)[:, None]}
        if "origin" in batch:
            rows["origin"] = batch["origin"].repeat_interleave(width).index_select(0, index)
        s_rows = student.select(index)
        t_rows = teacher.select(index) if teacher is not None else None
        chunk = fused.chunk_rows(self.fused_chunk, s_rows.width, s_rows.n)
        parts: dict[str, torch.Tensor] = {}
        row_w = None
        if self.sample_weight != "none":
            source = t_rows if self.sample_weight == "teacher_likelihood" else s_rows
            nll = torch.cat([cross_entropy(logits[:, None], rows["targets"][sel])[:, 0]
                             for sel, logits in source.each(chunk)]) if s_rows.n else rows["targets"].new_zeros(0)
            seq = index // width
            count = (targets != IGNORE_INDEX).sum(-1)
            summed = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device).index_add_(
                0, seq, nll.float())
            raw = (-summed / count.clamp_min(1)).exp().clamp_min(self.min_weight) * (count > 0)
            parts[WEIGHT_SUM] = raw.sum()
            parts[WEIGHT_ROWS] = (count > 0).sum().float()
            row_w = raw.index_select(0, seq)[:, None]  # [N, 1]
        weights = self.weights()
        values = {key: torch.zeros((), dtype=torch.float32, device=targets.device) for key in self.keys}

        def chunk_loss(s: torch.Tensor, t: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor:
            own = {k: v[sel] for k, v in rows.items()}
            total, got = self._terms(s[:, None], None if t is None else t[:, None], own, num_tokens,
                                     None if row_w is None else row_w[sel], weights)
            for key, v in got.items():
                values[key] += v
            return total

        loss = fused.fused_loss(chunk_loss, s_rows, t_rows, chunk, grad_scale)
        return loss, {**parts, **values}

