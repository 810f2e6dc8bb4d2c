"""Batched generation: left-padded prompts, KV cache, stop at EOS, seeded per batch.

    texts, lengths = generate(model, tokenizer, examples, GenerationSpec(max_new_tokens=64), seed=10)

Decoding follows *only* the given spec. Passing a fresh ``GenerationConfig`` is not enough:
``generate`` fills every unset field from the model's own ``generation_config`` (transformers
5), so defaults a checkpoint ships in its ``generation_config.json`` (Qwen's top_p=0.8 and
repetition_penalty=1.05, for one) would leak into the evaluation protocol. The model's config is
swapped for the spec's while generating.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from kdexp.data.encode import Example, collate_prompts, left_padded


@dataclass(frozen=True)
class SamplingSpec:
    """Decoding parameters shared by evaluation (``eval.*``) and training rollouts (``rollout.*``)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 64

    @classmethod
    def from_cfg(cls, cfg: Mapping):
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg and cfg[f.name] is not None})


@dataclass(frozen=True)
class GenerationSpec(SamplingSpec):
    no_repeat_ngram_size: int = 0  # 0: off

    def hf_config(self, eos_ids: list[int], pad_id: int) -> GenerationConfig:
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k} \
            if self.do_sample else {"temperature": None, "top_p": None, "top_k": None}
        return GenerationConfig(do_sample=self.do_sample, max_new_tokens=self.max_new_tokens,
                                no_repeat_ngram_size=self.no_repeat_ngram_size, eos_token_id=eos_ids,
                                pad_token_id=pad_id, use_cache=True, num_beams=1,
                                repetition_penalty=1.0, **sampling)


def batch_seed(seed: int, batch_index: int) -> int:
    """A seed per (run seed, batch): a batch's samples depend on nothing evaluated before it."""
    return (seed * 1_000_003 + batch_index) % (2**63)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, examples: Sequence[Example], spec: GenerationSpec,
             seed: int, batch_size: int = 32, desc: str = "generate",
             ) -> tuple[list[str], list[int]]:
    """Decoded responses and their lengths in tokens (EOS excluded), one per example.

    The model runs in eval mode (dropout off) and the global RNG is left as it was, so
    evaluating in the middle of training does not change the training run.
    """
    eos_ids = [tokenizer.eos_token_id]
    pad_id = tokenizer.pad_token_id
    config = spec.hf_config(eos_ids, pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    shipped, hf_model.generation_config = hf_model.generation_config, config
    texts: list[str] = []
    lengths: list[int] = []
    starts = range(0, len(examples), batch_size)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for b, start in enumerate(tqdm(starts, desc=desc, leave=False, unit="batch")):
                batch = collate_prompts(examples[start:start + batch_size], pad_id)
                torch.manual_seed(batch_seed(seed, b))
                out = model.generate(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device),
                                     generation_config=config,
                                     synced_gpus=False)  # full parameters here, even under ZeRO-3
                new = out[:, batch["input_ids"].shape[1]:].tolist()  # [B, <= max_new_tokens]
                for row in new:
                    n = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                    lengths.append(n)
                    texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    finally:
        hf_model.generation_config = shipped
        model.train(was_training)
    return texts, lengths


# --- Training rollouts ------------------------------------------------------------------------
# Methods that train on generated outputs sample them here, with a decode loop of our own: it
# returns the log-probability of every sampled token under the sampling policy and under the
# student (importance weights), and it can sample from a token-level mixture of two models,
# which ``generate`` cannot.


@dataclass(frozen=True)
class RolloutSpec(SamplingSpec):
    """Sampling parameters of training rollouts (``rollout.*``), separate from the loss temperature."""

    do_sample: bool = True
    stop_ids: tuple[int, ...] = ()  # stop tokens besides the tokenizer's EOS

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@dataclass
class Sampled:
    """One rollout: the response tokens (up to and including the first stop token, which is
    kept, also when pad == eos) and, per response token, its log-probability under the
    sampling distribution and under the student's own (untempered, unfiltered) distribution;
    and under the teacher's, untempered, when it was scored (``score_teacher``).
    """

    response_ids: list[int]
    logp_sampler: list[float]
    logp_student: list[float]
    logp_teacher: list[float] | None = None


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of ``logits`` [B, V]: cut tokens become -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        cut = before >= top_p
        cut[..., 0] = False
        logits = logits.masked_fill(cut.scatter(-1, order, cut), float("-inf"))
    return logits


def cache_key(model: torch.nn.Module) -> str:
    """The keyword of ``model.forward`` that takes and returns its KV cache: transformers >= 5.25
    calls it ``cache`` and warns on the old ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Decoder:
    """Incremental forward passes of one model over a left-padded batch, with a KV cache."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, vocab: int | None):
        self.model, self.vocab, self.cache = model, vocab, None
        self.cache_key = cache_key(model)
        self.mask = mask
        self.position = (mask.cumsum(-1) - 1).clamp_min(0)
        self.logits = self._forward(ids, self.position)

    def _forward(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position,
                         use_cache=True, **{self.cache_key: self.cache})
        self.cache = getattr(out, self.cache_key, None)
        logits = out.logits[:, -1].float()
        return logits if self.vocab is None else logits[:, : self.vocab]  # [B, V]

    def step(self, token: torch.Tensor, alive: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, alive[:, None].to(self.mask.dtype)], dim=1)
        self.position = self.position[:, -1:] + 1
        self.logits = self._forward(token[:, None], self.position)


@torch.no_grad()
def sample(student: torch.nn.Module, prompts: Sequence[list[int]], spec: RolloutSpec, eos_id: int,
           pad_id: int, generator: torch.Generator, teacher: torch.nn.Module | None = None,
           teacher_mix: float = 0.0, vocab: int | None = None, score_teacher: bool = False,
           ) -> list[Sampled]:
    """Sample one response per prompt from the student, or from ``teacher_mix * p + (1 -
    teacher_mix) * q`` (MiniLLM's teacher-mixed sampling, Gu et al. ICLR 2024, Sec. 2.2) when a
    teacher is given. ``student`` / ``teacher`` are plain (unwrapped) models in eval mode.
    ``score_teacher``: also return the teacher's log-probability of every sampled token
    (MiniLLM's reward), from the same incremental passes.

    Prompts of different lengths are left-padded and their positions counted from their first
    real token, so each row is decoded exactly as it would be alone. A row stops at its first
    stop token (``eos_id`` or ``spec.stop_ids``); the batch stops when every row has.
    """
    device = next(student.parameters()).device
    ids, mask = (t.to(device) for t in left_padded(prompts, pad_id))
    decoders = [_Decoder(student, ids, mask, vocab)]
    if teacher is not None and (teacher_mix > 0 or score_teacher):
        decoders.append(_Decoder(teacher, ids, mask, vocab))
    stops = torch.tensor(sorted({eos_id, *spec.stop_ids}), device=device)
    alive = torch.ones(len(prompts), dtype=torch.bool, device=device)
    tokens, logp_sampler, logp_student, logp_teacher = [], [], [], []
    for _ in range(spec.max_new_tokens):
        log_q = decoders[0].logits.log_softmax(-1)  # [B, V]
        policy = _policy(decoders[0].logits, spec)
        if len(decoders) == 2 and teacher_mix > 0:  # in probability space, after each model's temperature and cuts
            log_p = _policy(decoders[1].logits, spec)
            policy = log_p if teacher_mix == 1 else torch.logaddexp(
                log_p + math.log(teacher_mix), policy + math.log1p(-teacher_mix))
        if spec.do_sample:
            token = torch.multinomial(policy.exp(), 1, generator=generator).squeeze(1)
        else:
            token = policy.argmax(-1)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        logp_sampler.append(policy.gather(1, token[:, None]).squeeze(1))
        logp_student.append(log_q.gather(1, token[:, None]).squeeze(1))
        if score_teacher and len(decoders) == 2:
            logp_teacher.append(decoders[1].logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1))
        was_alive = alive
        alive = alive & ~torch.isin(token, stops)
        if not alive.any():
            break
        for d in decoders:
            d.step(token, was_alive)
    return _unpack(tokens, logp_sampler, logp_student, stops, logp_teacher)


def _through_stop(row: Sequence[int], stops: set[int]) -> int:
    """The length of ``row`` up to and including its first stop token (all of it without one)."""
    return next((i + 1 for i, t in enumerate(row) if t in stops), len(row))


def _policy(logits: torch.Tensor, spec: RolloutSpec) -> torch.Tensor:
    """Log-probabilities of sampling each token: temperature, then top-k / top-p cuts."""
    return filter_logits((logits / spec.temperature).log_softmax(-1), spec.top_k, spec.top_p).log_softmax(-1)


def _unpack(tokens: list[torch.Tensor], logp_sampler: list[torch.Tensor],
            logp_student: list[torch.Tensor], stops: torch.Tensor,
            logp_teacher: list[torch.Tensor]) -> list[Sampled]:
    """Per-row responses, cut after the first stop token."""
    toks = torch.stack(tokens, 1).tolist()  # [B, N]
    ls, lq = torch.stack(logp_sampler, 1).tolist(), torch.stack(logp_student, 1).tolist()
    lp = torch.stack(logp_teacher, 1).tolist() if logp_teacher else [None] * len(toks)
    stop_set = set(stops.tolist())
    out = []
    for row, a, b, c in zip(toks, ls, lq, lp, strict=True):
        n = _through_stop(row, stop_set)
        out.append(Sampled(row[:n], a[:n], b[:n], None if c is None else c[:n]))
    return out


@torch.no_grad()
def score(student: torch.nn.Module, prompts: Sequence[list[int]], responses: Sequence[list[int]],
          spec: RolloutSpec, eos_id: int, pad_id: int, vocab: int | None = None) -> list[Sampled]:
    """Responses sampled elsewhere (a vLLM engine) as :func:`sample` returns its own: each cut
    after its first stop token, with the log-probability of every token under the sampling
    policy (``spec``'s temperature and cuts) and under the student, from one teacher-forced
    forward of ``student`` over the left-padded batch. The log-probabilities are the trained
    model's, not the engine's (whose kernels and precision differ)."""
    stops = {eos_id, *spec.stop_ids}
    cut = [list(r[:_through_stop(r, stops)]) for r in responses]
    device = next(student.parameters()).device
    ids, mask = (t.to(device) for t in left_padded([list(p) + r for p, r in zip(prompts, cut, strict=True)], pad_id))
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = max(len(r) for r in cut) + 1  # the rows are right-aligned: the responses are in the last positions
    logits = student(input_ids=ids, attention_mask=mask, position_ids=position, logits_to_keep=keep).logits
    if vocab is not None:
        logits = logits[..., :vocab]
    out = []
    for b, response in enumerate(cut):
        if not response:
            out.append(Sampled([], [], []))
            continue
        # the logits at position t predict token t + 1: the response's tokens are predicted
        # from the last prompt token on
        at = logits[b, keep - len(response) - 1:keep - 1].float()  # [n, V]
        token = torch.tensor(response, device=device)[:, None]
        out.append(Sampled(response, _policy(at, spec).gather(1, token).squeeze(1).tolist(),
                           at.log_softmax(-1).gather(1, token).squeeze(1).tolist()))
    return out
