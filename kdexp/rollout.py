"""Batched generation: left-padded prompts, KV cache, stop at EOS, seeded per batch.

    texts, lengths = generate(model, tokenizer, examples, GenerationSpec(max_new_tokens=64), seed=10)

Decoding follows *only* the given spec. Passing a fresh ``GenerationConfig`` is not enough:
``generate`` fills every unset field from the model's own ``generation_config`` (transformers
5), so defaults a checkpoint ships in its ``generation_config.json`` (Qwen's top_p=0.8 and
repetition_penalty=1.05, for one) would leak into the evaluation protocol. The model's config is
swapped for the spec's while generating.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from kdexp.data.encode import Example, collate_prompts


@dataclass(frozen=True)
class GenerationSpec:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 64
    no_repeat_ngram_size: int = 0  # 0: off

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> GenerationSpec:
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})

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
                                     generation_config=config)
                new = out[:, batch["input_ids"].shape[1]:].tolist()  # [B, <= max_new_tokens]
                for row in new:
                    n = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                    lengths.append(n)
                    texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    finally:
        hf_model.generation_config = shipped
        model.train(was_training)
    return texts, lengths
