"""``kdexp osd [DRAFT ...]``: online speculative decoding, simulated over a stream of prompts.

    kdexp osd                                     # the embedded student, fresh, as the tiny teacher's draft
    kdexp osd runs/DATE/TIME_train                # a distilled draft, static and updated online
    kdexp osd RUN osd.gamma=8 loss=rkl osd.positions=all osd.update_every=16

Liu et al., "Online Speculative Decoding" (ICML 2024, Sec. 4, Algorithm 2): a draft model
proposes tokens that the target verifies (exact speculative sampling,
:func:`kdexp.speculative.speculative_sample`). Verification computes the target's
distributions at every response position anyway, so serving yields distillation data for free:
the positions where the draft's proposal was rejected (``osd.positions=rejected``, the paper's
choice; ``all``: every response token) go to a buffer with the target's distributions there, and
every ``osd.update_every`` queries the draft takes ``osd.steps_per_update`` AdamW steps on the
buffer (the last ``osd.buffer_size`` queries' records; equal to ``update_every``, the paper's
policy, each record is used once) with the ``loss=`` divergence (the mean over the buffer's
positions). The draft keeps serving the next queries with its new weights.

The stream is a split's prompts in order (``osd.order``): ``drift`` groups them into phases by
a record field (``osd.key``; the toy task's ``family``), so the queries' distribution shifts at
each phase boundary; ``shuffle``: one phase in random order; ``file``: the split's own order.
Each DRAFT (a run directory, a model directory, a preset; none: the ``student=`` config) is run
in each of ``osd.modes``: ``static`` (as given) and ``online`` (updated while serving), on the
same stream with the same random numbers. Per window of ``osd.window`` queries the job reports
the acceptance rate (kept / verified proposals), ``alpha`` (``sum_x min(p, q)`` at the verified
proposals, its expectation), target-model tokens per target call, and the estimated speed-up
``tokens / (target calls + c x draft calls)`` over decoding with the target alone, with ``c`` the
draft's cost per forward pass relative to the target's (``osd.cost_ratio``; null: the ratio of
their parameter counts, what bounds decoding on memory bandwidth). The update steps are not
counted: OSD runs them on the spare compute of serving.

The models run on the GPU where there is one (``train.device=cpu``: on the CPU), one query at a
time, each model with a KV cache cropped back to the accepted tokens after a rejection
(:class:`kdexp.speculative.Context`): right for measuring acceptance, not a serving engine's
batched latency.

Output: ``osd.json`` (every query's counts, the windows, the updates' losses), ``osd.png``
(acceptance and tokens per call over the stream, the phases marked), ``osd.md`` (the summary
table, also printed) and, with ``logger=wandb``, the windows as W&B line plots, the figure and
the table.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp import losses
from kdexp.analyze import _write_json, resolve_subjects
from kdexp.config import problems as config_problems
from kdexp.data import collate_train, load_examples
from kdexp.data.encode import Example
from kdexp.errors import UserError, unknown_choice
from kdexp.evaluation import plots, reports
from kdexp.logging import make_logger
from kdexp.methods import loss_term
from kdexp.models import load_model, shared_vocab
from kdexp.speculative import speculative_sample

log = logging.getLogger(__name__)

ORDERS = ("drift", "shuffle", "file")
MODES = ("static", "online")
POSITIONS = ("rejected", "all")
# What each served query is counted by (summed per window and per phase into the rates).
COUNTS = ("accepted", "proposed", "alpha", "tokens", "target_calls", "draft_calls")


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------

def order_stream(examples: Sequence[Example], order: str, key: str, phases: Sequence[Sequence[str]] | None,
                 seed: int) -> tuple[list[Example], list[int]]:
    """The queries in serving order and the phase of each. ``drift``: one phase per entry of
    ``phases`` (a list of ``key`` values; null: one phase per value, sorted), the queries of a
    phase in random order; ``shuffle``: one phase, random order; ``file``: as given."""
    rng = random.Random(seed)
    if order == "file":
        return list(examples), [0] * len(examples)
    if order == "shuffle":
        out = list(examples)
        rng.shuffle(out)
        return out, [0] * len(out)
    values = [e.record.get(key) for e in examples]
    if any(v is None for v in values):
        raise UserError(f"osd.order=drift groups the queries by their '{key}' field, and some records have "
                        f"none: set osd.key=FIELD (a field of every record) or osd.order=shuffle")
    groups = [[str(v)] for v in sorted({str(v) for v in values})] if not phases else [
        [str(v) for v in ([p] if isinstance(p, str) else p)] for p in phases]
    known = {str(v) for v in values}
    for g in groups:
        for v in g:
            if v not in known:
                raise unknown_choice(f"osd.phases value ('{key}' of the {len(examples)} queries)", v, sorted(known))
    stream, phase_of = [], []
    for i, g in enumerate(groups):
        members = [e for e, v in zip(examples, values, strict=True) if str(v) in g]
        rng.shuffle(members)
        stream += members
        phase_of += [i] * len(members)
    return stream, phase_of


# ---------------------------------------------------------------------------------------------
# Serving with online updates
# ---------------------------------------------------------------------------------------------

@dataclass
class Record:
    """What one served query leaves in the buffer: its tokens (prompt + response), the indices
    of the tokens to learn, and the target's log-probabilities for each of them ``[n, V]``."""

    ids: list[int]
    positions: list[int]
    target_logp: torch.Tensor


def update(draft: torch.nn.Module, buffer: Sequence[Record], divergence, optimizer: torch.optim.Optimizer,
           steps: int, pad_id: int, vocab: int | None) -> float:
    """``steps`` optimizer steps of the draft on the buffer: the mean divergence over every
    buffered position, the draft's next-token logits there against the target's. Returns the
    last step's loss."""
    device = next(draft.parameters()).device
    batch = collate_train([Example(r.ids, [], {}) for r in buffer], pad_id)  # right-padded tokens and mask
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = torch.tensor([b for b, r in enumerate(buffer) for _ in r.positions], device=device)
    cols = torch.tensor([p - 1 for r in buffer for p in r.positions], device=device)  # the logits that predict token p
    teacher = torch.cat([r.target_logp for r in buffer]).to(device)  # [N, V]
    draft.train()
    loss = torch.zeros(())
    for _ in range(steps):
        logits = draft(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V']
        logits = logits[rows, cols][:, :vocab] if vocab else logits[rows, cols]  # [N, V]
        loss = divergence(logits, teacher).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
    draft.eval()
    return float(loss.detach())


def serve(draft: torch.nn.Module, target: torch.nn.Module, stream: Sequence[Example], o: DictConfig,
          divergence, online: bool, stop_ids: Sequence[int], pad_id: int, vocab: int | None,
          seed: int) -> dict[str, Any]:
    """Serve ``stream`` with speculative decoding, updating ``draft`` from its buffer if
    ``online``. Returns per-query counts and the updates' ``(query, loss)``."""
    g = torch.Generator().manual_seed(seed)
    buffer: deque[Record] = deque(maxlen=int(o.buffer_size))
    optimizer = torch.optim.AdamW(draft.parameters(), lr=float(o.lr), weight_decay=0.0) if online else None
    per_query: dict[str, list] = {k: [] for k in COUNTS}
    updates: list[list[float]] = []
    draft.eval()
    for i, ex in enumerate(stream):
        out = speculative_sample(draft, target, ex.prompt_ids, int(o.gamma), int(o.max_new_tokens), stop_ids, g,
                                 float(o.temperature), vocab)
        counts = {"accepted": out.accepted, "proposed": out.proposed, "alpha": sum(out.alpha),
                  "tokens": len(out.tokens), "target_calls": out.target_calls, "draft_calls": out.draft_calls}
        for k in COUNTS:
            per_query[k].append(counts[k])
        if not online:
            continue
        chosen = out.rejected if o.positions == "rejected" else list(range(len(out.tokens)))
        start = len(ex.prompt_ids)
        # every query takes a slot, with or without positions: the buffer is the last N queries
        buffer.append(Record(list(ex.prompt_ids) + out.tokens, [start + j for j in chosen], out.target_logp[chosen]))
        if (i + 1) % int(o.update_every) == 0 and (records := [r for r in buffer if r.positions]):
            loss = update(draft, records, divergence, optimizer, int(o.steps_per_update), pad_id, vocab)
            updates.append([i + 1, loss])
    return {**per_query, "updates": updates}


def windows(per_query: dict[str, list], size: int, cost_ratio: float) -> dict[str, list[float]]:
    """Per window of ``size`` consecutive queries (the last one may be shorter): ``query`` (the
    window's last query, 1-based), ``acceptance``, ``alpha``, ``tokens_per_call``, ``speedup``."""
    n = len(per_query["tokens"])
    out: dict[str, list[float]] = {k: [] for k in ("query", "acceptance", "alpha", "tokens_per_call", "speedup")}
    for start in range(0, n, size):
        s = {k: sum(per_query[k][start:start + size]) for k in COUNTS}
        out["query"].append(min(start + size, n))
        out.update({k: out[k] + [v] for k, v in summarize(s, cost_ratio).items()})
    return out


def summarize(s: dict[str, float], cost_ratio: float) -> dict[str, float]:
    """The rates of summed counts (``nan`` where nothing was proposed)."""
    nan = float("nan")
    return {"acceptance": s["accepted"] / s["proposed"] if s["proposed"] else nan,
            "alpha": s["alpha"] / s["proposed"] if s["proposed"] else nan,
            "tokens_per_call": s["tokens"] / s["target_calls"],
            "speedup": s["tokens"] / (s["target_calls"] + cost_ratio * s["draft_calls"])}


def phase_summary(per_query: dict[str, list], phase_of: Sequence[int], cost_ratio: float) -> dict[str, float]:
    """The whole stream's rates, and each phase's acceptance."""
    row = summarize({k: sum(per_query[k]) for k in COUNTS}, cost_ratio)
    for p in sorted(set(phase_of)) if len(set(phase_of)) > 1 else []:
        idx = [i for i, q in enumerate(phase_of) if q == p]
        row[f"phase{p + 1}_acceptance"] = summarize({k: sum(per_query[k][i] for i in idx) for k in COUNTS},
                                                    cost_ratio)["acceptance"]
    return row


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def _checks(cfg: DictConfig) -> None:
    o = cfg.osd
    issues = config_problems(cfg, keys=["data", "osd"])
    for key, allowed in (("order", ORDERS), ("positions", POSITIONS)):
        if o[key] not in allowed:
            issues.append(str(unknown_choice(f"osd.{key}", o[key], allowed)))
    for mode in o.modes:
        if mode not in MODES:
            issues.append(str(unknown_choice("osd.modes entry", mode, MODES)))
    if not o.modes:
        issues.append("osd.modes is empty: list static, online or both")
    if o.labels and len(o.labels) != max(len(o.drafts), 1):  # no drafts: one, the student
        issues.append(f"osd.labels has {len(o.labels)} names for {max(len(o.drafts), 1)} drafts; give one per draft")
    if issues:
        raise UserError("; ".join(issues))


def _divergence(cfg: DictConfig):
    """The ``loss=`` divergence with its parameters (what ``kdexp train`` would use)."""
    spec = loss_term(cfg, 1.0)
    name = spec.pop("loss")
    for key in ("weight", "t2_scale", "fused", "cross_tokenizer", "matched_weight"):
        spec.pop(key, None)
    if name not in losses.names():
        raise UserError(f"kdexp osd distills the draft with a divergence; loss={name} is not one "
                        f"(choose from {', '.join(losses.names())})")
    return losses.divergence(name, **spec)


def _subjects(cfg: DictConfig):
    """The drafts: ``osd.drafts`` (run dirs, model dirs, presets) or, if none, the student."""
    if cfg.osd.drafts:
        c = copy.deepcopy(cfg)
        with open_dict(c):
            c.analyze.models, c.analyze.labels = list(cfg.osd.drafts), list(cfg.osd.labels)
        subjects, teacher, _ = resolve_subjects(c)
        with open_dict(cfg):
            cfg.data = c.data  # a run's data, unless the command line set it
        return [(s.label, s.spec) for s in subjects], teacher
    if not cfg.teacher.get("name_or_path"):
        raise UserError("kdexp osd needs a target: add teacher=PRESET or teacher.name_or_path=PATH")
    return [(str(cfg.osd.labels[0]) if cfg.osd.labels else "student", cfg.student)], cfg.teacher


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_osd(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Serve the stream with each draft in each mode; write JSON, PNG, a table and W&B panels."""
    _checks(cfg)
    o = cfg.osd
    divergence = _divergence(cfg) if "online" in o.modes else None
    subjects, teacher_spec = _subjects(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    torch.manual_seed(int(cfg.seed))
    target, tokenizer = load_model(OmegaConf.merge(teacher_spec, {"lora": {"enabled": False}}), "teacher")
    target.to(device).eval()
    examples = load_examples(cfg.data, tokenizer, [o.split])[o.split]
    stream, phase_of = order_stream(examples, o.order, o.key, o.phases, int(o.seed))
    if o.max_queries:
        stream, phase_of = stream[: o.max_queries], phase_of[: o.max_queries]
    if not stream:
        raise UserError(f"the stream is empty: data={cfg.data.name} has no '{o.split}' prompts")
    stops = sorted({tokenizer.eos_token_id, *cfg.rollout.stop_ids})
    results: dict[str, Any] = {}
    for label, spec in subjects:
        for mode in o.modes:
            torch.manual_seed(int(cfg.seed))  # a fresh draft per mode: online changes it
            draft, tok = load_model(OmegaConf.merge(spec, {"lora": {"enabled": False}}), "draft")
            draft.to(device)
            vocab = shared_vocab(draft, tok, target, tokenizer, (label, "target"))
            c = float(o.cost_ratio) if o.cost_ratio is not None else _params(draft) / _params(target)
            name = f"{label} {mode}"
            log.info("osd: %s over %d queries", name, len(stream))
            served = serve(draft, target, stream, o, divergence, mode == "online", stops, tokenizer.pad_token_id,
                           vocab, int(o.seed))
            results[name] = {**served, "cost_ratio": c, "windows": windows(served, int(o.window), c),
                             "summary": phase_summary(served, phase_of, c)}
            del draft
    boundaries = [i for i in range(1, len(phase_of)) if phase_of[i] != phase_of[i - 1]]
    rows = {name: r["summary"] for name, r in results.items()}
    record = {"command": "osd", "data": cfg.data.name, "split": o.split, "queries": len(stream),
              "phase_of": phase_of, "phase_starts": boundaries, "target": str(teacher_spec.name_or_path),
              "settings": OmegaConf.to_container(o, resolve=True),
              "loss": OmegaConf.to_container(cfg.loss, resolve=True), "results": results, "summary": rows}
    figure = plot(results, boundaries, run_dir / "osd.png", cfg)
    table = reports.markdown("osd", rows).replace("kdexp analyze osd", "kdexp osd")
    _write_json(run_dir / "osd.json", record)
    (run_dir / "osd.md").write_text(table + "\n")
    logger = make_logger(cfg, run_dir, job_type="osd")
    try:
        for name, r in results.items():
            w = r["windows"]
            for j, q in enumerate(w["query"]):
                logger.log({f"osd/{name}/{k}": w[k][j] for k in ("acceptance", "alpha", "tokens_per_call", "speedup")},
                           q)
        columns = ["draft", *next(iter(rows.values())).keys()]
        logger.media({"osd/figure": figure}, {"osd/table": (columns, [[n, *row.values()] for n, row in rows.items()])})
        logger.summary({f"osd/{n}/{k}": v for n, row in rows.items() for k, v in row.items()})
    finally:
        logger.finish()
    print(f"\n{table}\n\nwrote osd.json, osd.png and osd.md to {run_dir}", flush=True)
    return record


def plot(results: dict[str, Any], boundaries: Sequence[int], path: Path, cfg: DictConfig) -> Path:
    """Acceptance and tokens per target call per window over the stream; phase starts dashed."""
    fig, axes = plots.figure(1, 2)
    for i, (name, r) in enumerate(results.items()):
        w = r["windows"]
        style = "-" if name.endswith("online") else "--"
        plots.curve(axes[0], w["query"], w["acceptance"], None, name, plots.color(i // len(cfg.osd.modes)), style)
        plots.curve(axes[1], w["query"], w["tokens_per_call"], None, name, plots.color(i // len(cfg.osd.modes)), style)
    for ax in axes[:2]:
        for b in boundaries:
            ax.axvline(b, color="gray", lw=0.8, ls=":")
    axes[0].set_ylim(0, 1.02)
    plots.finish(axes[0], f"acceptance rate per {cfg.osd.window} queries", "queries served", "kept / verified")
    plots.finish(axes[1], f"tokens per target call (γ={cfg.osd.gamma})", "queries served", "tokens")
    return plots.save(fig, path, "Online speculative decoding (Liu et al., 2024)")


__all__ = ["MODES", "ORDERS", "POSITIONS", "Record", "order_stream", "phase_summary", "run_osd", "serve",
           "update", "windows"]
