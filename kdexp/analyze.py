"""``kdexp analyze NAME [MODEL ...]``: why a student works, measured against its teacher.

    kdexp analyze exposure runs/DATE/TIME_train                        # one run against its teacher
    kdexp analyze exposure runs/sft_run runs/kd_run analyze.labels=[sft,kd]   # several on one plot
    kdexp analyze difficulty model=path/to/hf_model teacher=gpt2-xl data=dolly data.path=dolly.jsonl
    kdexp analyze speculative model=tiny                               # the teacher against itself
    kdexp analyze routing runs/moe_sft runs/moe_kd analyze.labels=[sft,kd]   # MoE students' routing

NAME is one of :data:`ANALYSES`: ``exposure``, ``difficulty``, ``calibration``, ``diversity``,
``speculative``, ``curves``, ``routing``. Each MODEL is a run directory (its final student; the first run
also gives the teacher and the data unless ``teacher=`` / ``data=`` are given), a model
directory, a preset or a hub name. Every model is compared with the same teacher (``routing``:
no teacher, the models' own routers) on the same prompts (``analyze.split``, the first ``analyze.max_samples``). The job writes ``NAME.json``
(every number, ``null`` where undefined), ``NAME.png``, ``NAME.md`` (a summary table, also
printed) and, with ``logger=wandb``, the figure, the table and the curves as W&B panels.

The estimators are the functions of :mod:`kdexp.evaluation.analysis`; here they are fed with
model outputs. Samples come from :func:`kdexp.rollout.sample` (the training rollouts' decoder:
KV cache, stop at EOS), seeded by ``analyze.seed``; error bars are one standard error, across
the ``analyze.n_samples`` samples drawn per prompt (exposure) or across sequences (per-step
curves) or prompts (diversity).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp import config
from kdexp.data import collate_train, load_examples
from kdexp.data.encode import Example
from kdexp.errors import UserError, unknown_choice
from kdexp.evaluation import analysis as est
from kdexp.evaluation import reports
from kdexp.files import write_atomic
from kdexp.jobs import _overridden, resolve_model
from kdexp.logging import make_logger
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.methods.context import stable_seed
from kdexp.models import load_model, load_tokenizer, route, router_shape, shared_vocab, vocab_rows
from kdexp.rollout import RolloutSpec, sample

log = logging.getLogger(__name__)

DECODINGS = ("sample", "greedy")
# MCE leaves out bins holding under 1 % of the predictions: the gap of a bin of a handful of
# tokens is noise, and it would decide the maximum.
MCE_MIN_SHARE = 0.01


# ---------------------------------------------------------------------------------------------
# Model outputs: samples and position-aligned logits
# ---------------------------------------------------------------------------------------------

def sample_responses(model: torch.nn.Module, examples: Sequence[Example], spec: RolloutSpec,
                     n: int, seed: int, eos_id: int, pad_id: int, batch_size: int,
                     vocab: int | None = None, origin: str = "student") -> list[list[Example]]:
    """``n`` replicates, each with one sampled response per example (EOS kept when reached).

    Replicate k holds the k-th sample of every prompt, so per-replicate estimates are
    independent and their spread gives the error bars.
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    reps = []
    try:
        for _ in range(n):
            out: list[Example] = []
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                drawn = sample(model, [e.prompt_ids for e in chunk], spec, eos_id, pad_id, g, vocab=vocab)
                out += [e.with_response(s.response_ids, origin) for e, s in zip(chunk, drawn, strict=True)]
            reps.append(out)
    finally:
        model.train(was_training)
    return reps


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab: int | None) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    logits = out.logits.float()
    return logits if vocab is None else logits[..., :vocab]


@torch.no_grad()
def eval_batches(models: Sequence[torch.nn.Module], examples: Sequence[Example], pad_id: int,
                 batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The examples in padded batches (:func:`kdexp.data.collate_train`), every model in eval
    mode meanwhile (each model's mode is restored after)."""
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for start in range(0, len(examples), batch_size):
            yield collate_train(examples[start:start + batch_size], pad_id)
    finally:
        for m, s in zip(models, states, strict=True):
            m.train(s)


def scored_batches(models: Sequence[torch.nn.Module], examples: Sequence[Example], pad_id: int,
                   batch_size: int, vocab: int | None = None,
                   ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Teacher-forced logits of every model on prompt + response, batch by batch.

    Yields ``(logits [B, T, V] per model, targets [B, T], mask [B, T])``: position t predicts
    ``targets[:, t]``, and ``mask`` marks the response tokens (the positions that are scored).
    """
    for batch in eval_batches(models, examples, pad_id, batch_size):
        logits = [_logits(m, batch, vocab) for m in models]
        targets = batch["targets"].to(logits[0].device)
        yield logits, targets, targets != IGNORE_INDEX


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged float64 rows -> ``(values [N, L], mask [N, L])``."""
    width = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = r
        mask[i, : len(r)] = True
    return values, mask


PositionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def along_response(fns: dict[str, PositionFn], student: torch.nn.Module, teacher: torch.nn.Module,
                   examples: Sequence[Example], pad_id: int, batch_size: int, vocab: int | None = None,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-response-token values ``fn(student_logits, teacher_logits, targets, mask) -> [B, T]``,
    re-indexed so that column t is the t-th response token: ``({name: [N, L]}, mask [N, L])``."""
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in fns}
    for (s, t), targets, mask in scored_batches([student, teacher], examples, pad_id, batch_size, vocab):
        for name, fn in fns.items():
            values = fn(s, t, targets, mask)
            rows[name] += [v[m].double().cpu() for v, m in zip(values, mask, strict=True)]
    out = {k: _pad_rows(r) for k, r in rows.items()}
    mask = next(iter(out.values()))[1]
    return {k: v for k, (v, _) in out.items()}, mask


def _kl(s, t, targets, mask):
    return est.kl_per_position(s, t, mask)


def reached(mask: torch.Tensor, min_count: int = 1) -> int:
    """The number of leading steps that at least ``min_count`` sequences reached (all of them,
    if there are fewer)."""
    short = (mask.sum(0) < max(1, min(min_count, mask.shape[0]))).nonzero()
    return int(short[0]) if len(short) else mask.shape[1]


def _stack(tables: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Several ``(values, mask)`` tables cut or padded to ``width`` columns, one under the other."""
    vs, ms = [], []
    for v, m in tables:
        pad = max(0, width - v.shape[1])
        vs.append(torch.nn.functional.pad(v, (0, pad))[:, :width])
        ms.append(torch.nn.functional.pad(m, (0, pad))[:, :width])
    return torch.cat(vs), torch.cat(ms)


def _curve(values: torch.Tensor, mask: torch.Tensor) -> dict[str, list]:
    mean, se, count = est.per_position_mean(values, mask)
    return {"step": list(range(1, len(mean) + 1)), "mean": mean.tolist(), "se": se.tolist(),
            "count": count.tolist()}


def _across(runs: Sequence[dict[str, list[float]]], key: str) -> list[float]:
    """One standard error of ``key`` across replicate results (nan for fewer than two)."""
    if len(runs) < 2:
        return [math.nan] * len(runs[0][key])
    table = torch.tensor([r[key] for r in runs], dtype=torch.float64)
    return (table.std(0, correction=1) / math.sqrt(len(runs))).tolist()


# ---------------------------------------------------------------------------------------------
# The estimators on models
# ---------------------------------------------------------------------------------------------

def exposure_curves(student: torch.nn.Module, teacher: torch.nn.Module,
                    teacher_reps: Sequence[Sequence[Example]], student_reps: Sequence[Sequence[Example]],
                    pad_id: int, batch_size: int, vocab: int | None = None, max_steps: int | None = None,
                    min_count: int = 1) -> dict[str, Any]:
    """Exposure-bias curves of Arora et al. (Findings of ACL 2022) from sampled prefixes.

    ``eps_t``: mean KL(p_teacher || q_student) at response step t over the teacher's samples;
    ``regret_t``: the same over the student's samples; then ``R(l)``, ``eps(l)``, ``AccErr(l)``
    and ``ExAccErr(l)`` of :func:`kdexp.evaluation.analysis.exposure_metrics` for l up to the
    last step that every replicate reached on both sides (sequences stop at EOS) and that at
    least ``min_count`` sequences of each side reached, pooled over replicates. The headline
    curves pool every replicate; ``*_se`` is the standard error across replicates.
    """
    eps = [along_response({"kl": _kl}, student, teacher, rep, pad_id, batch_size, vocab) for rep in teacher_reps]
    reg = [along_response({"kl": _kl}, student, teacher, rep, pad_id, batch_size, vocab) for rep in student_reps]
    eps_tabs = [(v["kl"], m) for v, m in eps]
    reg_tabs = [(v["kl"], m) for v, m in reg]
    length = min(reached(m) for _, m in eps_tabs + reg_tabs)
    for tabs in (eps_tabs, reg_tabs):
        length = min(length, reached(_stack(tabs, length)[1], min_count))
    if max_steps:
        length = min(length, int(max_steps))
    if length == 0:
        raise UserError("no response token to score: every sample was empty")
    pooled_eps, pooled_reg = _curve(*_stack(eps_tabs, length)), _curve(*_stack(reg_tabs, length))
    out: dict[str, Any] = est.exposure_metrics(pooled_eps["mean"], pooled_reg["mean"])
    replicates = [est.exposure_metrics(est.per_step_mean(*_stack([e], length))[0],
                                       est.per_step_mean(*_stack([r], length))[0])
                  for e, r in zip(eps_tabs, reg_tabs, strict=True)]
    for key in ("R", "eps", "AccErr", "ExAccErr"):
        out[f"{key}_se"] = _across(replicates, key)
    out.update({"eps_t": pooled_eps["mean"], "eps_t_se": pooled_eps["se"], "count_teacher": pooled_eps["count"],
                "regret_t": pooled_reg["mean"], "regret_t_se": pooled_reg["se"],
                "count_student": pooled_reg["count"], "n_samples": len(teacher_reps)})
    return out


def _empirical_acceptance(generator: torch.Generator) -> PositionFn:
    """Speculative sampling simulated: draft x ~ q, accepted with probability min(1, p(x)/q(x))."""

    def fn(s, t, targets, mask):
        log_q, log_p = est.log_probs(s), est.log_probs(t)
        flat = log_q.reshape(-1, log_q.shape[-1]).exp().cpu()
        x = torch.multinomial(flat, 1, generator=generator).view(log_q.shape[:-1]).to(log_q.device)
        ratio = (log_p.gather(-1, x[..., None]) - log_q.gather(-1, x[..., None])).squeeze(-1).exp()
        u = torch.rand(ratio.shape, generator=generator).to(ratio.device)
        return (u < ratio.clamp(max=1)).double()

    return fn


def speculative_acceptance(student: torch.nn.Module, teacher: torch.nn.Module,
                           teacher_reps: Sequence[Sequence[Example]], pad_id: int, batch_size: int,
                           vocab: int | None = None, gammas: Sequence[int] = (1, 2, 4, 8), seed: int = 0,
                           min_count: int = 1) -> dict[str, Any]:
    """The student as the draft model of speculative sampling for the teacher.

    Along prefixes sampled from the teacher (speculative sampling's output is distributed as
    the teacher's), ``alpha_t = sum_x min(p(x), q(x))`` (Leviathan et al., ICML 2023, Sec. 3),
    per response step and averaged over every token; ``empirical``: the acceptance frequency of
    the actual accept / reject test with drafts from the student, which estimates the same
    number; ``expected_tokens[g]``: tokens per teacher call with g drafts, ``(1 - alpha^(g+1))
    / (1 - alpha)`` (their Eq. 1, for i.i.d. acceptances). The per-step curve stops where
    fewer than ``min_count`` sequences are left; the means use every token.
    """
    g = torch.Generator().manual_seed(seed)
    fns = {"alpha": lambda s, t, y, m: est.acceptance_rate(s, t), "empirical": _empirical_acceptance(g)}
    tables = [along_response(fns, student, teacher, rep, pad_id, batch_size, vocab) for rep in teacher_reps]
    width = max(m.shape[1] for _, m in tables)
    alpha, mask = _stack([(v["alpha"], m) for v, m in tables], width)
    empirical, _ = _stack([(v["empirical"], m) for v, m in tables], width)
    length = reached(mask, min_count)
    mean = alpha[mask].mean().item()
    expected = {str(k): (k + 1.0 if mean >= 1 else (1 - mean ** (k + 1)) / (1 - mean)) for k in gammas}
    return {"alpha": mean, "empirical": empirical[mask].mean().item(), "tokens": int(mask.sum()),
            "expected_tokens": expected, "per_step": _curve(alpha[:, :length], mask[:, :length])}


def kl_curves(student: torch.nn.Module, teacher: torch.nn.Module, references: Sequence[Example],
              student_reps: Sequence[Sequence[Example]], pad_id: int, batch_size: int,
              vocab: int | None = None, min_count: int = 1) -> dict[str, Any]:
    """Per-step KL(p_teacher || q_student) along the response, on the references
    (teacher-forced) and on the student's own samples (free-running). The curves stop where
    fewer than ``min_count`` sequences are left; ``kl`` is the mean over every token."""
    out = {}
    for name, sets in (("teacher_forced", [references]), ("free_running", student_reps)):
        tables = [along_response({"kl": _kl}, student, teacher, rep, pad_id, batch_size, vocab) for rep in sets]
        values, mask = _stack([(v["kl"], m) for v, m in tables], max(m.shape[1] for _, m in tables))
        length = reached(mask, min_count)
        out[name] = {**_curve(values[:, :length], mask[:, :length]), "kl": values[mask].mean().item()}
    return out


def difficulty(student: torch.nn.Module, teacher: torch.nn.Module, references: Sequence[Example],
               pad_id: int, batch_size: int, vocab: int | None = None, n_buckets: int = 10) -> dict[str, Any]:
    """Rao et al.'s token-difficulty buckets on the references (see
    :func:`kdexp.evaluation.analysis.difficulty_buckets`), plus the overall KL and agreement."""
    acc = est.DifficultyAccumulator(n_buckets)
    total_kl, total_agree, n = 0.0, 0.0, 0
    for (s, t), targets, mask in scored_batches([student, teacher], references, pad_id, batch_size, vocab):
        acc.add(s, t, targets, mask)
        total_kl += est.kl_per_position(s, t, mask).sum().item()
        total_agree += ((s.argmax(-1) == t.argmax(-1)) & mask).sum().item()
        n += int(mask.sum())
    return {**acc.result(), "kl_all": total_kl / n, "top1_agreement_all": 100 * total_agree / n, "tokens": n}


def calibration(model: torch.nn.Module, references: Sequence[Example], pad_id: int, batch_size: int,
                vocab: int | None = None, n_bins: int = 15) -> dict[str, Any]:
    """ECE / MCE and reliability bins of next-token predictions on the references."""
    acc = est.CalibrationAccumulator(n_bins, MCE_MIN_SHARE)
    for (z,), targets, mask in scored_batches([model], references, pad_id, batch_size, vocab):
        acc.add(z, targets, mask)
    return acc.result()


def diversity(texts: Sequence[Sequence[str]], max_n: int = 4) -> dict[str, Any]:
    """Distinct-1..max_n and Self-BLEU among the samples of each prompt (mean and standard
    error over prompts), and distinct-n over all samples together (``corpus_distinct_n``)."""
    out: dict[str, Any] = {}

    def mean_se(values: list[float]) -> tuple[float, float]:
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        return statistics.fmean(values), se

    for n in range(1, max_n + 1):
        out[f"distinct_{n}"], out[f"distinct_{n}_se"] = mean_se([est.distinct_n(t, n) for t in texts])
        out[f"corpus_distinct_{n}"] = est.distinct_n([x for t in texts for x in t], n)
    out["self_bleu"], out["self_bleu_se"] = mean_se([est.self_bleu(t, max_n) for t in texts])
    out["mean_words"] = statistics.fmean(len(x.split()) for t in texts for x in t)
    return out


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts routing
# ---------------------------------------------------------------------------------------------

@dataclass
class Routed:
    """A model's routing where each response token is predicted (the positions of prompt +
    response whose next token is a response token), per example."""

    probs: list[torch.Tensor]  # [L, n_i, E] each: the router's distribution (models.router_probs)
    chosen: list[torch.Tensor]  # [L, n_i, k] each: the experts chosen
    read: bool  # the experts as the routers chose them (else the top k of probs)
    scoring: str


@torch.no_grad()
def routed(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int) -> Routed:
    """The routing of every example's response positions (:func:`kdexp.models.route`)."""
    device = next(model.parameters()).device
    out = Routed([], [], True, "softmax")
    for batch in eval_batches([model], examples, pad_id, batch_size):
        got = route(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        if got is None:
            raise UserError(f"{type(model).__name__} returned no router logits: kdexp analyze routing needs a "
                            "mixture-of-experts model (Mixtral, Qwen-MoE, OLMoE, DeepSeek, ...)")
        mask = batch["targets"] != IGNORE_INDEX  # [B, T]
        out.probs += [got.probs[:, b, mask[b]].cpu() for b in range(mask.shape[0])]
        out.chosen += [got.chosen[:, b, mask[b]].cpu() for b in range(mask.shape[0])]
        out.read, out.scoring = out.read and got.read, got.scoring
    if not out.read:
        log.warning("%s: the experts its routers chose could not be read from their outputs; the analysis takes the "
                    "top %d of each router's distribution instead (right for a plain top-k router like Mixtral's, "
                    "not for a biased or group-limited one like DeepSeek's)", type(model).__name__,
                    out.chosen[0].shape[-1] if out.chosen else 0)
    return out


def routing(model: torch.nn.Module, references: Sequence[Example], own_reps: Sequence[Sequence[Example]],
            pad_id: int, batch_size: int, min_count: int = 1) -> dict[str, Any]:
    """The router along the response: on the references (teacher-forced prefixes, as in
    training) and on the model's own samples of the same prompts (free-running, as in use).

    ``agreement``: per layer and response step t, ``|A ∩ B| / k`` of the sets of experts chosen
    where the t-th response token is predicted under the two prefixes (the same position; step
    1 predicts from the prompt alone, which both share, so it is 1); mean per layer over every
    step both responses reach, and the per-step curves (stopping where fewer than ``min_count``
    pairs are left). ``entropy``: the entropy of the router's distribution over the experts
    (:func:`kdexp.models.router_probs`), mean per layer on each kind of prefix; ``load``: per
    layer, each expert's share of the assignments on each kind. ``chosen``: whether the experts
    are those the routers chose (``router``), or the top k of their distribution (``top-k``).
    """
    ref = routed(model, references, pad_id, batch_size)
    own = [routed(model, rep, pad_id, batch_size) for rep in own_reps]
    n_layers, experts = ref.probs[0].shape[0], ref.probs[0].shape[-1]
    rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for rep in own:
        for r, o in zip(ref.chosen, rep.chosen, strict=True):
            m = min(r.shape[1], o.shape[1])
            agree = est.expert_overlap(r[:, :m], o[:, :m])  # [L, m]
            for layer in range(n_layers):
                rows[layer].append(agree[layer])
    per_layer = [_pad_rows(r) for r in rows]
    length = reached(per_layer[0][1], min_count)
    kinds = {"teacher_forced": [ref], "free_running": own}
    probs = {k: torch.cat([p for x in v for p in x.probs], 1) for k, v in kinds.items()}
    chosen = {k: torch.cat([c for x in v for c in x.chosen], 1) for k, v in kinds.items()}
    return {"layers": n_layers, "experts": experts, "top_k": int(ref.chosen[0].shape[-1]),
            "chosen": "router" if all(x.read for x in (ref, *own)) else "top-k", "scoring": ref.scoring,
            "tokens": int(per_layer[0][1].sum()),
            "agreement": [v[m].mean().item() for v, m in per_layer],
            "per_step": [_curve(v[:, :length], m[:, :length]) for v, m in per_layer],
            "entropy": {k: est.routing_entropy(v).mean(-1).tolist() for k, v in probs.items()},
            "load": {k: [est.expert_load(v[layer], experts).tolist() for layer in range(n_layers)]
                     for k, v in chosen.items()}}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

@dataclass
class Subject:
    """A model to analyze: its legend label and model spec (and its run's config, if a run)."""

    label: str
    spec: Any
    run_cfg: DictConfig | None = None


@dataclass
class Job:
    """What every analysis of one ``kdexp analyze`` call shares: settings, teacher, prompts."""

    cfg: DictConfig
    teacher: torch.nn.Module
    tokenizer: Any
    examples: list[Example]
    teacher_vocab: int | None
    _teacher_reps: dict[str, list[list[Example]]] = field(default_factory=dict)

    @property
    def a(self) -> DictConfig:
        return self.cfg.analyze

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def spec(self, decoding: str = "sample") -> RolloutSpec:
        a = self.a
        return RolloutSpec(do_sample=decoding == "sample", temperature=float(a.temperature),
                           top_p=float(a.top_p), top_k=int(a.top_k), max_new_tokens=int(a.max_new_tokens))

    def n_for(self, decoding: str) -> int:
        return int(self.a.n_samples) if decoding == "sample" else 1  # greedy: one answer per prompt

    def samples(self, model: torch.nn.Module, decoding: str, vocab: int | None, origin: str) -> list[list[Example]]:
        seed = config_seed(self.cfg, origin, decoding)
        return sample_responses(model, self.examples, self.spec(decoding), self.n_for(decoding), seed,
                                self.tokenizer.eos_token_id, self.pad_id, int(self.a.batch_size), vocab, origin)

    def teacher_samples(self, decoding: str) -> list[list[Example]]:
        """The teacher's samples: drawn once, shared by every model analyzed."""
        if decoding not in self._teacher_reps:
            self._teacher_reps[decoding] = self.samples(self.teacher, decoding, self.teacher_vocab, "teacher")
        return self._teacher_reps[decoding]

    def texts(self, reps: Sequence[Sequence[Example]]) -> list[list[str]]:
        """Decoded samples grouped by prompt: ``[prompt][sample]``."""
        eos = self.tokenizer.eos_token_id
        decoded = [[self.tokenizer.decode([i for i in e.response_ids if i != eos], skip_special_tokens=True)
                    .strip() for e in rep] for rep in reps]
        return [list(per_prompt) for per_prompt in zip(*decoded, strict=True)]


def config_seed(cfg: DictConfig, *key: object) -> int:
    return stable_seed(int(cfg.analyze.seed), "analyze", *key)


def _exposure(job: Job, model, vocab) -> dict[str, Any]:
    out = {}
    for decoding in job.a.decoding:
        out[decoding] = exposure_curves(model, job.teacher, job.teacher_samples(decoding),
                                        job.samples(model, decoding, vocab, "student"), job.pad_id,
                                        int(job.a.batch_size), vocab, job.a.max_steps, int(job.a.min_count))
    return out


def _difficulty(job: Job, model, vocab) -> dict[str, Any]:
    return difficulty(model, job.teacher, job.examples, job.pad_id, int(job.a.batch_size), vocab,
                      int(job.a.n_buckets))


def _calibration(job: Job, model, vocab) -> dict[str, Any]:
    return calibration(model, job.examples, job.pad_id, int(job.a.batch_size), vocab, int(job.a.n_bins))


def _diversity(job: Job, model, vocab) -> dict[str, Any]:
    return diversity(job.texts(job.samples(model, "sample", vocab, "student")))


def _speculative(job: Job, model, vocab) -> dict[str, Any]:
    return speculative_acceptance(model, job.teacher, job.teacher_samples("sample"), job.pad_id,
                                  int(job.a.batch_size), vocab, list(job.a.gammas),
                                  config_seed(job.cfg, "accept"), int(job.a.min_count))


def _routing(job: Job, model, vocab) -> dict[str, Any]:
    if router_shape(model) is None:
        raise UserError(f"kdexp analyze routing reads a mixture-of-experts model's router, and "
                        f"{type(model).__name__} has none (student=tiny-moe is one)")
    out = routing(model, job.examples, job.samples(model, "sample", vocab, "student"), job.pad_id,
                  int(job.a.batch_size), int(job.a.min_count))
    return {**out, "prompts": len(job.examples)}  # in the model's own tokens: its length filters may keep others


def _curves(job: Job, model, vocab) -> dict[str, Any]:
    return kl_curves(model, job.teacher, job.examples, job.samples(model, "sample", vocab, "student"),
                     job.pad_id, int(job.a.batch_size), vocab, int(job.a.min_count))


# name -> (compute, also analyze the teacher itself as a reference line)
ANALYSES: dict[str, tuple[Callable[[Job, Any, Any], dict[str, Any]], bool]] = {
    "exposure": (_exposure, False),
    "difficulty": (_difficulty, False),
    "calibration": (_calibration, True),
    "diversity": (_diversity, True),
    "speculative": (_speculative, False),
    "curves": (_curves, False),
    "routing": (_routing, False),
}
NO_TEACHER = {"routing"}  # analyses of the models alone


def _run_config(path: Path) -> DictConfig | None:
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        return OmegaConf.load(path / "config.yaml")
    return None


def _default_label(target: str, label: str, run_cfg: DictConfig | None) -> str:
    if run_cfg is None:
        return label
    method = run_cfg.method.name
    return method if method in ("sft", "seqkd") else f"{method} ({run_cfg.loss.name})"


def resolve_subjects(cfg: DictConfig, need_teacher: bool = True) -> tuple[list[Subject], Any, str]:
    """The models to analyze, the teacher spec and its label. The first run directory (if any)
    sets ``data`` and the teacher unless the command line sets them. Without ``need_teacher``
    the teacher may be unset (None)."""
    a = cfg.analyze
    targets = [str(t) for t in (a.models or ([cfg.model] if cfg.model else []))]
    if not targets:
        raise UserError("which model? kdexp analyze NAME RUN_DIR [RUN_DIR ...] (or model=PATH_OR_PRESET)")
    if a.labels and len(a.labels) != len(targets):
        raise UserError(f"analyze.labels has {len(a.labels)} names for {len(targets)} models; give one per model")
    subjects = []
    for i, target in enumerate(targets):
        c = cfg if i == 0 else copy.deepcopy(cfg)
        with open_dict(c):
            c.model = target
        spec, label = resolve_model(c)
        run_cfg = _run_config(Path(target).expanduser())
        subjects.append(Subject(str(a.labels[i]) if a.labels else _default_label(target, label, run_cfg),
                                spec, run_cfg))
    seen: dict[str, int] = {}
    for s in subjects:  # the same method twice: number them
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label = f"{s.label} #{seen[s.label]}"
    first = subjects[0].run_cfg
    for s in subjects[1:]:
        if s.run_cfg is not None and first is not None and s.run_cfg.data.name != first.data.name:
            log.warning("%s was trained on data=%s, but every model is analyzed on the prompts of the "
                        "first run (data=%s)", s.label, s.run_cfg.data.name, first.data.name)
    teacher, teacher_label = cfg.teacher, "teacher"
    if first is not None and not _overridden("teacher") and first.teacher.get("name_or_path"):
        teacher = first.teacher
    if not teacher.get("name_or_path"):
        if not need_teacher:
            return subjects, None, teacher_label
        raise UserError("these analyses compare a model with a teacher, and none is set: "
                        "add teacher=PRESET or teacher.name_or_path=PATH")
    return subjects, teacher, teacher_label


def run_analyze(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``analyze.name`` on every model; write JSON, PNG, a table, and W&B panels."""
    name = cfg.analyze.name
    if name not in ANALYSES:
        raise unknown_choice("analysis", name, ANALYSES)
    compute, with_teacher = ANALYSES[name]
    for d in cfg.analyze.decoding:
        if d not in DECODINGS:
            raise unknown_choice("analyze.decoding entry", d, DECODINGS)
    if name in ("diversity",) and int(cfg.analyze.n_samples) < 2:
        raise UserError("diversity compares samples of the same prompt: set analyze.n_samples >= 2")
    needs_teacher = name not in NO_TEACHER
    subjects, teacher_spec, teacher_label = resolve_subjects(cfg, needs_teacher)
    issues = config.problems(cfg, keys=["data", "analyze"])
    if issues:
        raise UserError("; ".join(issues))
    torch.manual_seed(int(cfg.seed))
    teacher, t_vocab = None, None
    if needs_teacher:
        teacher, tokenizer = load_model(OmegaConf.merge(teacher_spec, {"lora": {"enabled": False}}), "teacher")
        t_vocab = min(vocab_rows(teacher), len(tokenizer))
        t_vocab = t_vocab if t_vocab < vocab_rows(teacher) else None
    else:  # no teacher: each model reads the prompts in its own tokens (the first's checked here)
        tokenizer = load_tokenizer(subjects[0].spec, "model")

    def prompts(tokenizer) -> list[Example]:
        examples = load_examples(cfg.data, tokenizer, [cfg.analyze.split])[cfg.analyze.split]
        return examples[: cfg.analyze.max_samples] if cfg.analyze.max_samples else examples

    examples = prompts(tokenizer)
    job = Job(cfg, teacher, tokenizer, examples, t_vocab)
    results: dict[str, Any] = {}
    if with_teacher:
        results[teacher_label] = compute(job, teacher, job.teacher_vocab)
    for s in subjects:
        torch.manual_seed(int(cfg.seed))
        model, tok = load_model(s.spec, "model")
        vocab = shared_vocab(model, tok, teacher, tokenizer, (s.label, teacher_label)) if teacher is not None else None
        if teacher is None and s is not subjects[0]:
            job = Job(cfg, None, tok, prompts(tok), None)
            if len(job.examples) != len(examples):
                log.warning("%s reads %d prompts, %s %d: in each model's own tokens, data.max_prompt_length keeps "
                            "different ones", s.label, len(job.examples), subjects[0].label, len(examples))
        log.info("analyze %s: %s", name, s.label)
        results[s.label] = compute(job, model, vocab)
        del model
    record = {"analysis": name, "data": cfg.data.name, "split": cfg.analyze.split, "prompts": len(examples),
              "teacher": str(teacher_spec.name_or_path) if needs_teacher else None, "models": [s.label for s in subjects],
              "settings": OmegaConf.to_container(cfg.analyze, resolve=True), "results": results}
    figure = reports.PLOTS[name](results, run_dir / f"{name}.png", cfg)
    rows = reports.SUMMARIES[name](results, cfg)
    table = reports.markdown(name, rows)
    _write_json(run_dir / f"{name}.json", {**record, "summary": rows})
    (run_dir / f"{name}.md").write_text(table + "\n")
    logger = make_logger(cfg, run_dir, job_type="analyze")
    try:
        logger.log({f"analyze/{name}/{label}/{k}": v for label, row in rows.items() for k, v in row.items()}, 0)
        logger.media({f"analyze/{name}": figure},
                     {f"analyze/{name}/table": _table(rows),
                      **{f"analyze/{name}/{k}": t for k, t in reports.long_tables(name, results).items()}})
    finally:
        logger.finish()
    print(f"\n{table}\n\nwrote {name}.json, {name}.png and {name}.md to {run_dir}", flush=True)
    return record


def _table(rows: dict[str, dict[str, float]]) -> tuple[list[str], list[list[Any]]]:
    columns = ["model", *next(iter(rows.values())).keys()]
    return columns, [[label, *row.values()] for label, row in rows.items()]


def _finite(obj: Any) -> Any:
    """JSON has no nan / inf: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n")
