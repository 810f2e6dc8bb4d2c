"""Policy-gradient terms, their sources and schedules: MiniLLM's clipped policy gradient and
its rollout store, REINFORCE for GKD + RL and its rewarded samples, and TAID's schedule of ``t``.

The terms are ordinary objective terms (``fn(student_logits, teacher_logits, batch) -> [B,
T]``, averaged over valid target positions); what they need from the rollout (the student's
log-probabilities at sampling time, the sampling distribution's, the advantage of each
sequence) arrives in the batch as ``value_*`` tensors aligned with the targets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdexp import losses
from kdexp.data.encode import Example
from kdexp.errors import UserError
from kdexp.evaluation.metrics import exact_match, rouge_l
from kdexp.losses import Bound
from kdexp.losses.divergences import finite, log_probs
from kdexp.losses.objective import IGNORE_INDEX, TERMS, TermFn
from kdexp.methods.context import Context
from kdexp.methods.sources import Source, load_pt_corpus, pack_example, unpack_example

log = logging.getLogger(__name__)


def token_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, 0 where ignored. [B, T, V] x [B, T] -> [B, T]"""
    safe = targets.clamp_min(0)
    logp = logits.float().log_softmax(-1).gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, logp, 0.0)


def normalized_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = sum_{k >= t} gamma^(k - t) r_k / |{k >= t valid}|`` per row. [B, T] -> [B, T]

    MiniLLM's length-normalized return (Gu et al., ICLR 2024, Sec. 2.2 "Length
    Normalization"; the reference code's return includes the current step's reward and
    divides by the number of valid tokens from t to the end).
    """
    r = rewards * mask
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    remaining = mask.flip(1).cumsum(1).flip(1).clamp_min(1)
    return out / remaining * mask


def minillm_pg(*, clip: float = 0.2) -> tuple[TermFn, bool]:
    """MiniLLM's policy-gradient term with importance weights and PPO clipping.

    Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR
    2024, Eq. 5-7 and Sec. 2.2: the ratio ``exp(log q_theta - log q_old) * w_t`` with the
    teacher-mixed importance weight ``w_t = q_old(y_t) / (alpha p + (1 - alpha) q_old)(y_t)``,
    and the clipped surrogate ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))``. The
    advantage ``A`` arrives with the rollouts (``value_advantage``): :class:`RolloutStore`
    computes it when it samples them, from the teacher's reward, whitened over every rollout
    token of the store on every process (:func:`minillm_advantages`).
    """
    if not 0 < clip < 1:
        raise UserError(f"minillm_pg: clip={clip} is out of range")

    def fn(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
           batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["targets"]
        mask = (targets != IGNORE_INDEX).float()
        logq = token_logp(student_logits, targets)
        logq_old, advantage = batch["value_logq_old"], batch["value_advantage"]
        weight = (logq_old - batch["value_logp_sampler"]).exp()
        ratio = (logq - logq_old).exp() * weight
        return torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip)) * mask

    return fn, False


def minillm_advantages(rows: Sequence[Example], gamma: float, reward_scaling: float,
                       reward_clip: float, reduce_sum=None) -> list[list[float]]:
    """MiniLLM's advantage of every token of ``rows`` (rollouts that carry ``logp_teacher`` and
    ``logq_old``), Gu et al., ICLR 2024, Sec. 2.2.

    Per token the reward ``r_t = (log p(y_t) - log q_old(y_t)) / reward_scaling``, clipped to
    +-reward_clip; its length-normalized discounted return (:func:`normalized_returns`); then
    whitened with the mean and variance over every token of ``rows`` and, through
    ``reduce_sum`` (a sum over processes), of every process's rows. The reference whitens each
    micro-batch (over all processes); over the whole store the advantage of a token does not
    depend on how the store is cut into micro-batches or spread over processes.
    """
    returns = []
    for e in rows:
        reward = (torch.tensor(e.values["logp_teacher"], dtype=torch.float64)
                  - torch.tensor(e.values["logq_old"], dtype=torch.float64)) / reward_scaling
        reward = reward.clamp(-reward_clip, reward_clip)[None]  # [1, T]
        returns.append(normalized_returns(reward, torch.ones_like(reward), gamma)[0])
    flat = torch.cat(returns) if returns else torch.zeros(0, dtype=torch.float64)
    reduce_sum = reduce_sum or (lambda x: x)
    total, count = reduce_sum(torch.stack([flat.sum(), torch.tensor(float(flat.numel()), dtype=torch.float64)]))
    mean = total / count.clamp_min(1)
    var = reduce_sum(((flat - mean) ** 2).sum()) / count.clamp_min(1)
    scale = torch.rsqrt(var + 1e-8)
    return [((r - mean) * scale).tolist() for r in returns]


def reinforce() -> tuple[TermFn, bool]:
    """REINFORCE with a baseline: ``-A * log q(y_t)`` per response token, where the batch's
    ``value_advantage`` holds the sequence's reward minus its baseline (Williams, 1992)."""

    def fn(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
           batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return -batch["value_advantage"] * token_logp(student_logits, batch["targets"])

    return fn, False


def taid_ce(**params: Any) -> tuple[TermFn, bool]:
    """TAID's loss in the reference implementation's cross-entropy form ``-sum_v p_t log q``:
    ``KL(p_t || q)`` (the ``taid`` divergence) plus the entropy of ``p_t``, which carries no
    gradient (``p_t`` holds the student's logits detached). Same gradient as ``loss=taid``;
    the value is what TAID's schedule measures its relative improvement on. The returned
    function exposes the divergence as ``fn.divergence`` so the schedule can move its ``t``.
    """
    bound = losses.divergence("taid", **params)

    def fn(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
           batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            t, temperature = float(bound.params["t"]), float(bound.params.get("temperature", 1.0))
            log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
            target = ((1 - t) * finite(log_q) + t * finite(log_p)).log_softmax(-1)
            entropy = -(target.exp() * target).sum(-1).float()
        return bound(student_logits, teacher_logits) + entropy

    fn.divergence = bound  # type: ignore[attr-defined]
    return fn, True


TERMS.add("minillm_pg", minillm_pg)
TERMS.add("reinforce", reinforce)
TERMS.add("taid_ce", taid_ce)


REWARDS = ("exact_match", "rougeL", "teacher_loglik")


class Rewarded(Source):
    """Student samples for every micro-batch, each scored by a reward, with the
    leave-one-out mean of the other sequences of the micro-batch as its baseline:
    ``value_advantage = R_i - mean_{j != i} R_j`` on every response token.

    Rewards: ``exact_match`` and ``rougeL`` of the decoded response against the references
    (in [0, 1]), or ``teacher_loglik``, the teacher's mean per-token log-probability of it.
    """

    def __init__(self, reward: str):
        if reward not in REWARDS:
            raise UserError(f"method.reward must be one of {', '.join(REWARDS)}, got '{reward}'")
        self.reward = reward
        self.needs_teacher = reward == "teacher_loglik"
        self.last_mean = 0.0

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        rows = ctx.micro_rollout([ctx.train[i] for i in indices], "student", step, micro)
        rewards = self.score(ctx, rows)
        self.last_mean = sum(rewards) / len(rewards)
        n = len(rows)
        for e, r in zip(rows, rewards, strict=True):
            baseline = (sum(rewards) - r) / (n - 1)
            e.values["advantage"] = [r - baseline] * len(e.response_ids)
        return rows

    def score(self, ctx: Context, rows: Sequence[Example]) -> list[float]:
        if self.reward == "teacher_loglik":
            return teacher_loglik(ctx, rows)
        metric = exact_match if self.reward == "exact_match" else rouge_l
        texts = [ctx.tokenizer.decode(e.response_ids, skip_special_tokens=True).strip() for e in rows]
        return [metric(t, e.record["references"]) / 100.0 for t, e in zip(texts, rows, strict=True)]

    def metrics(self) -> dict[str, float]:
        return {"reward": self.last_mean}


@torch.no_grad()
def teacher_loglik(ctx: Context, rows: Sequence[Example]) -> list[float]:
    """The teacher's mean log-probability per response token of each row."""
    from kdexp.data.encode import collate_train

    device = ctx.accelerator.device
    batch = {k: v.to(device) for k, v in collate_train(rows, ctx.tokenizer.pad_token_id).items()}
    logits = ctx.teacher.distributions(batch, autocast=False)
    targets = batch["targets"].to(device)
    logp = token_logp(logits, targets)
    count = (targets != IGNORE_INDEX).sum(-1).clamp_min(1)
    return (logp.sum(-1) / count).tolist()


class TaidSchedule(Source):
    """TAID's adaptive interpolation parameter (Shing et al., ICLR 2025, Sec. 3.2, Alg. 1).

    After each training step with objective value ``J`` (the cross-entropy form
    ``-sum p_t log q`` of the TAID term, as the reference implementation uses): relative
    improvement ``delta = (J_prev - J) / J_prev``, momentum ``m = beta * m + (1 - beta) *
    delta``, and ``t = min(t_end, max(t_linear, t + alpha * sigmoid(m) * (1 - t)))`` with the
    linear floor ``t_linear = t_start + (t_end - t_start) * step / total``.
    """

    def __init__(self, divergence: Bound, key: str, t_start: float, t_end: float, alpha: float,
                 beta: float):
        if not 0 <= t_start <= t_end <= 1:
            raise UserError(f"method.t_start ({t_start}) and method.t_end ({t_end}) must satisfy "
                            f"0 <= t_start <= t_end <= 1")
        self.divergence, self.key = divergence, key
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t, self.momentum, self.previous = t_start, 0.0, None
        divergence.params["t"] = self.t

    def after_step(self, ctx: Context, step: int, values: Mapping[str, float]) -> None:
        loss = values[self.key]
        if self.previous is not None:
            delta = (self.previous - loss) / (self.previous + 1e-15)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * delta
            linear = self.t_start + (self.t_end - self.t_start) * step / ctx.max_steps
            rise = self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
            self.t = min(self.t_end, max(linear, self.t + rise))
            self.divergence.params["t"] = self.t
        self.previous = loss

    def metrics(self) -> dict[str, float]:
        return {"taid_t": self.t}

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "momentum": self.momentum, "previous": self.previous}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t, self.momentum, self.previous = float(state["t"]), float(state["momentum"]), state["previous"]
        self.divergence.params["t"] = self.t


class RolloutStore(Source):
    """MiniLLM's rollouts (Gu et al., ICLR 2024, Alg. 1): ``num_rollouts`` responses sampled
    from the teacher-mixed policy ``alpha * p + (1 - alpha) * q``, then ``ppo_epochs`` passes
    over them in shuffled micro-batches before the store is refilled with the latest student.
    With ``pt`` examples (``method.pt_data``) every micro-batch also carries as many
    pre-training sequences (origin ``pt``) for the language-modelling term.

    The sampler also scores every rollout token under the teacher (the reward needs ``log
    p``), and each refill computes the advantages of the whole store at once
    (:func:`minillm_advantages`; ``gamma``, ``reward_scaling``, ``reward_clip``), as the
    reference computes rewards when it samples.
    """

    needs_teacher = True

    def __init__(self, num_rollouts: int, ppo_epochs: int, teacher_mix: float, pt_data: str | None = None,
                 gamma: float = 0.95, reward_scaling: float = 0.5, reward_clip: float = 100.0):
        for name, value, ok in (("gamma", gamma, 0 <= gamma <= 1), ("reward_scaling", reward_scaling, reward_scaling > 0),
                                ("reward_clip", reward_clip, reward_clip > 0)):
            if not ok:
                raise UserError(f"method.{name}={value} is out of range")
        self.num_rollouts, self.ppo_epochs, self.teacher_mix = num_rollouts, ppo_epochs, teacher_mix
        self.gamma, self.reward_scaling, self.reward_clip = gamma, reward_scaling, reward_clip
        self.pt_data = pt_data
        if pt_data and not Path(pt_data).expanduser().is_file():
            raise UserError(f"method.pt_data: {pt_data} is not a file; give a .jsonl (a 'text' field "
                            f"per line) or a .txt file (one document per line)")
        self.pt: list[Example] = []
        self.store: list[Example] = []
        self.order: list[int] = []
        self.refills, self.served, self.pt_served = 0, 0, 0

    def setup(self, ctx: Context, resumed: bool) -> None:
        if self.pt_data:
            self.pt = load_pt_corpus(self.pt_data, ctx.tokenizer, ctx.max_length)

    def micro_batch(self, ctx: Context, indices: list[int], step: int, micro: int) -> list[Example]:
        if self.served >= len(self.order):
            self._refill(ctx)
        picks = self.order[self.served:self.served + len(indices)]
        self.served += len(picks)
        rows = [self.store[j] for j in picks]
        if self.pt:
            perm = ctx.permutation(len(self.pt), "pt", self.pt_served // len(self.pt), ctx.rank)
            start = self.pt_served % len(self.pt)
            rows += [self.pt[perm[(start + j) % len(self.pt)]] for j in range(len(indices))]
            self.pt_served += len(indices)
        return rows

    def _refill(self, ctx: Context) -> None:
        per_rank = max(1, self.num_rollouts // ctx.world)
        prompts = ctx.permutation(len(ctx.train), "minillm-prompts", self.refills)
        # Every rank's store holds per_rank rollouts (wrapping around a split smaller than the
        # store), so all ranks refill at the same micro-batch: the refill's all-reduce pairs up.
        mine = [prompts[(ctx.rank * per_rank + j) % len(prompts)] for j in range(per_rank)]
        self.store = ctx.rollout([ctx.train[i] for i in mine], "minillm", self.refills,
                                 teacher_mix=self.teacher_mix, score_teacher=True)
        advantages = minillm_advantages(self.store, self.gamma, self.reward_scaling, self.reward_clip,
                                        ctx.reduce_sum)
        for e, a in zip(self.store, advantages, strict=True):
            e.values["advantage"] = a
        self.order = [j for epoch in range(self.ppo_epochs)
                      for j in ctx.permutation(len(self.store), "minillm-order", self.refills, epoch, ctx.rank)]
        self.served = 0
        self.refills += 1

    def metrics(self) -> dict[str, float]:
        return {"refills": float(self.refills)}

    def state_dict(self) -> dict[str, Any]:
        return {"store": [pack_example(e) for e in self.store], "order": self.order, "served": self.served,
                "refills": self.refills, "pt_served": self.pt_served}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.store = [unpack_example(e) for e in state["store"]]
        self.order, self.served = list(state["order"]), int(state["served"])
        self.refills, self.pt_served = int(state["refills"]), int(state["pt_served"])
        if any("advantage" not in e.values for e in self.store):
            # A checkpoint of kdexp before 2026-11-30 (advantages were computed in the loss):
            # its rollouts lack them, so the next micro-batch refills the store.
            log.warning("the checkpoint's MiniLLM rollouts carry no advantages (an older kdexp); "
                        "the rollout store is refilled")
            self.served = len(self.order)
