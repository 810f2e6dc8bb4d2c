"""Policy-gradient terms and schedules: MiniLLM's clipped policy gradient, REINFORCE for
GKD + RL, the rewards of sampled responses, and TAID's schedule of ``t``.

The terms are ordinary objective terms (``fn(student_logits, teacher_logits, batch) -> [B,
T]``, averaged over valid target positions); what they need from the rollout (the student's
log-probabilities at sampling time, the sampling distribution's, the advantage of each
sequence) arrives in the batch as ``value_*`` tensors aligned with the targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
from kdexp.methods.sources import Source


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


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid positions (0 elsewhere)."""
    n = mask.sum().clamp_min(1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def minillm_pg(*, clip: float = 0.2, gamma: float = 0.95, reward_scaling: float = 0.5,
               reward_clip: float = 100.0) -> tuple[TermFn, bool]:
    """MiniLLM's policy-gradient term with importance weights and PPO clipping.

    Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR
    2024, Eq. 5-7 and Sec. 2.2: per-token reward ``r_t = (log p(y_t) - log q_old(y_t)) /
    reward_scaling`` (clipped to +-reward_clip), the length-normalized discounted return,
    whitened over the micro-batch's valid tokens (the advantage; no value model), the ratio
    ``exp(log q_theta - log q_old) * w_t`` with the teacher-mixed importance weight
    ``w_t = q_old(y_t) / (alpha p + (1 - alpha) q_old)(y_t)``, and the clipped surrogate
    ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))``.
    """
    for name, value, ok in (("clip", clip, 0 < clip < 1), ("gamma", gamma, 0 <= gamma <= 1),
                            ("reward_scaling", reward_scaling, reward_scaling > 0),
                            ("reward_clip", reward_clip, reward_clip > 0)):
        if not ok:
            raise UserError(f"minillm_pg: {name}={value} is out of range")

    def fn(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
           batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["targets"]
        mask = (targets != IGNORE_INDEX).float()
        logq = token_logp(student_logits, targets)
        logq_old = batch["value_logq_old"]
        with torch.no_grad():
            logp = token_logp(teacher_logits, targets)
            reward = ((logp - logq_old) / reward_scaling).clamp(-reward_clip, reward_clip)
            advantage = whiten(normalized_returns(reward, mask, gamma), mask)
            weight = (logq_old - batch["value_logp_sampler"]).exp()
        ratio = (logq - logq_old).exp() * weight
        return torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip)) * mask

    return fn, True


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

    batch = collate_train(rows, ctx.tokenizer.pad_token_id)
    device = ctx.accelerator.device
    logits = ctx.teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits
    if ctx.vocab is not None:
        logits = logits[..., :ctx.vocab]
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
