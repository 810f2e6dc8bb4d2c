"""The known sequence teacher as a Hugging Face causal LM, and its exact sequence-level answers.

    kdexp train teacher=markov student=markov data=markov method=gkd    # every method runs on it
    from kdexp.known import markov
    truth = markov.exact(teacher_probs, student_probs)   # sequence KLs, eps_t, regret_t: exact

:class:`MarkovLM` (``model_type: kdexp-markov``, registered with ``AutoModelForCausalLM`` when
kdexp loads models) predicts the next token from the last ``order`` tokens only, through a table
of logits, one row per context. Built from a config with ``chain_seed`` set, its table is the
chain of :mod:`kdexp.known.chain` (log-probabilities): the teacher, defined by its config alone.
Without one it is a trainable table, drawn under the torch seed: an order-1 student of an
order-2 teacher cannot represent it, so methods must choose what to give up.

:func:`exact` computes, by dynamic programming over the alive pair states (no sampling), the
sequence-level KL in both directions over the responses up to ``max_response`` tokens (the chain
rule: the sum over steps of the expected per-step KL on the sampling side's own prefixes), and
the per-step curves of ``kdexp analyze exposure``: ``eps_t`` (KL(p || q) at step t on the
teacher's prefixes) and ``regret_t`` (the same on the student's prefixes), Arora et al.,
Findings of ACL 2022, Sec. 3.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from kdexp.known.chain import EOS, Chain

# transformers >= 5.25 names the output's cache `cache` (`past_key_values` stays as an alias)
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MarkovConfig(PretrainedConfig):
    model_type = "kdexp-markov"

    def __init__(self, vocab_size: int = 13, order: int = 1, init_std: float = 0.5,
                 chain_seed: int | None = None, **kwargs: Any):
        self.vocab_size, self.order, self.init_std, self.chain_seed = vocab_size, order, init_std, chain_seed
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(key, EOS)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def chain(self) -> Chain | None:
        """The known chain this config defines (``chain_seed`` set), or None (a student)."""
        if self.chain_seed is None:
            return None
        return Chain.from_config(self.to_dict())


@dataclass
class MarkovState:
    """The incremental decoder's cache: the last ``order`` tokens of every row (masked -> EOS)."""
    tokens: torch.Tensor


class MarkovLM(PreTrainedModel, GenerationMixin):
    """Logits of the next token = ``table[context]``, the context being the last ``order``
    tokens (padding and positions before the start count as EOS)."""
    config_class = MarkovConfig
    base_model_prefix = "markov"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: MarkovConfig):
        super().__init__(config)
        rows = config.vocab_size ** config.order
        self.table = torch.nn.Parameter(torch.zeros(rows, config.vocab_size))
        self.post_init()
        self.reset_table()

    def reset_table(self) -> None:
        chain = self.config.chain()
        with torch.no_grad():
            if chain is not None:
                if chain.vocab != self.config.vocab_size or chain.order != self.config.order:
                    raise ValueError(f"the chain has vocab {chain.vocab} and order {chain.order}, the "
                                     f"config {self.config.vocab_size} and {self.config.order}")
                self.table.copy_(log_table(chain))
            else:
                self.table.normal_(0.0, self.config.init_std)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # generate: no Hugging Face cache object
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:  # the table is set in reset_table
        return

    def get_input_embeddings(self) -> torch.nn.Module | None:
        return None

    def context_index(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens (history included) -> [B, T - order + 1] rows of the table."""
        index = torch.zeros_like(ids[:, self.config.order - 1:])
        for j in range(self.config.order):
            index = index * self.config.vocab_size + ids[:, j: ids.shape[1] - self.config.order + 1 + j]
        return index

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: MarkovState | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, cache: MarkovState | None = None,
                **_: Any) -> CausalLMOutputWithPast:
        past_key_values = past_key_values if past_key_values is not None else cache
        ids = input_ids if attention_mask is None else torch.where(
            attention_mask[:, -input_ids.shape[1]:].bool(), input_ids, torch.zeros_like(input_ids))
        history = (past_key_values.tokens if isinstance(past_key_values, MarkovState)
                   else ids.new_zeros(ids.shape[0], self.config.order - 1))
        full = torch.cat([history[:, history.shape[1] - (self.config.order - 1):] if self.config.order > 1
                          else history[:, :0], ids], 1)
        logits = self.table[self.context_index(full)]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        cache = MarkovState(full[:, full.shape[1] - self.config.order:]) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **_: Any) -> dict[str, Any]:
        """``generate`` passes the whole sequence every step (the table is cheap; no cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load ``kdexp-markov`` directories."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        AutoConfig.register(MarkovConfig.model_type, MarkovConfig)
        AutoModelForCausalLM.register(MarkovConfig, MarkovLM)
    except ValueError:  # already registered
        pass


# ---------------------------------------------------------------------------------------------
# Exact answers
# ---------------------------------------------------------------------------------------------

def log_table(chain: Chain) -> torch.Tensor:
    """The chain's next-token log-probabilities, one row per context: [vocab ** order, vocab], float64."""
    return torch.tensor(chain.table, dtype=torch.float64).log()


def as_pairs(model_or_table: torch.nn.Module | torch.Tensor, vocab: int) -> torch.Tensor:
    """Next-token probabilities ``[a, b, x]`` = p(x | a, b), float64, for an order-1 or order-2
    :class:`MarkovLM` (or its table of logits)."""
    table = model_or_table.table.detach() if isinstance(model_or_table, torch.nn.Module) else model_or_table
    probs = table.double().softmax(-1)
    if probs.shape[0] == vocab:             # order 1: the same row whatever came before
        return probs.unsqueeze(0).expand(vocab, vocab, vocab)
    return probs.view(vocab, vocab, vocab)


def prompt_pairs(chain: Chain, prompts: list[list[int]] | None = None) -> torch.Tensor:
    """The distribution of the last two prompt tokens ``[a, b]``: uniform over the states (the
    chain's prompts) or the empirical one of ``prompts``. The exact answers here are for chains
    of order 1 or 2 with prompts of at least two tokens."""
    if chain.order > 2 or chain.prompt_length < 2:
        raise ValueError(f"exact answers need order <= 2 and prompts of >= 2 tokens, got order {chain.order} "
                         f"and prompt_length {chain.prompt_length}")
    m = torch.zeros(chain.vocab, chain.vocab, dtype=torch.float64)
    if prompts is None:
        m[1:, 1:] = 1.0 / chain.states ** 2
        return m
    for p in prompts:
        m[p[-2], p[-1]] += 1.0 / len(prompts)
    return m


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0).sum(-1)


def occupancy(process: torch.Tensor, start: torch.Tensor, steps: int) -> torch.Tensor:
    """``[steps, a, b]``: the probability that ``process`` (``[a, b, x]``) is still running at
    response step t with the last two tokens ``(a, b)``, from the pair distribution ``start``."""
    out, m = [], start
    for _ in range(steps):
        out.append(m)
        flow = m.unsqueeze(-1) * process               # [a, b, x]
        m = flow.sum(0).clone()                         # -> [b, x]
        m[:, EOS] = 0.0                                 # EOS ends the sequence
    return torch.stack(out)


@dataclass
class Exact:
    kl_pq: float                 # sequence-level KL(p || q): teacher samples
    kl_qp: float                 # sequence-level KL(q || p): the student's own samples
    eps_t: list[float]           # E[KL(p_t || q_t) | alive at t], prefixes from the teacher
    regret_t: list[float]        # the same, prefixes from the student
    alive_p: list[float]         # P(teacher still running at t)
    alive_q: list[float]


def exact(teacher: torch.Tensor, student: torch.Tensor, start: torch.Tensor, steps: int) -> Exact:
    """The sequence-level answers for teacher / student pair tables (:func:`as_pairs`)."""
    kl_step = _kl(teacher, student)                     # [a, b]: KL(p(.|a,b) || q(.|a,b))
    occ_p, occ_q = occupancy(teacher, start, steps), occupancy(student, start, steps)
    alive_p, alive_q = occ_p.sum((1, 2)), occ_q.sum((1, 2))
    eps = (occ_p * kl_step).sum((1, 2))
    regret = (occ_q * kl_step).sum((1, 2))
    return Exact(float(eps.sum()), float((occ_q * _kl(student, teacher)).sum()),
                 (eps / alive_p.clamp_min(1e-300)).tolist(), (regret / alive_q.clamp_min(1e-300)).tolist(),
                 alive_p.tolist(), alive_q.tolist())


def sequence_kl(teacher: torch.Tensor, student: torch.Tensor, start: torch.Tensor, steps: int,
                direction: str = "pq") -> torch.Tensor:
    """Differentiable sequence-level KL (``pq``: KL(p || q); ``qp``: KL(q || p))."""
    sampler, a, b = (teacher, teacher, student) if direction == "pq" else (student, student, teacher)
    return (occupancy(sampler, start, steps) * _kl(a, b)).sum()


def _minimize(objective, init: torch.Tensor, iters: int) -> torch.Tensor:
    """``argmin objective`` by L-BFGS (strong Wolfe line search) from ``init``."""
    x = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss
    opt.step(closure)
    return x.detach()


def best_order1(teacher: torch.Tensor, start: torch.Tensor, steps: int, direction: str = "pq",
                iters: int = 300) -> tuple[torch.Tensor, float]:
    """The order-1 student closest to ``teacher`` in sequence-level KL: ``(table of logits
    [b, x], KL)``. Forward (``pq``) in closed form: the teacher's next-token distribution
    averaged over its own occupancy of the pairs ``(a, b)`` given ``b`` (the occupancy does not
    depend on the student, so this is a weighted log-likelihood); reverse (``qp``) by L-BFGS on
    the exact objective, started from the forward optimum and from uniform, the better kept."""
    vocab = teacher.shape[0]
    occ = occupancy(teacher, start, steps).sum(0)                       # [a, b]
    counts = (occ.unsqueeze(-1) * teacher).sum(0)                       # [b, x]
    counts = counts + (counts.sum(-1, keepdim=True) == 0) * teacher.mean((0, 1))  # unreached b
    forward = (counts / counts.sum(-1, keepdim=True)).clamp_min(1e-300).log()
    if direction == "pq":
        return forward, float(sequence_kl(teacher, as_pairs(forward, vocab), start, steps, "pq"))
    best: tuple[torch.Tensor, float] | None = None
    for init in (forward, torch.zeros_like(forward)):
        logits = _minimize(lambda x: sequence_kl(teacher, as_pairs(x, vocab), start, steps, "qp"),
                           init.clamp_min(-30.0), iters)
        value = float(sequence_kl(teacher, as_pairs(logits, vocab), start, steps, "qp"))
        if math.isfinite(value) and (best is None or value < best[1]):
            best = (logits, value)
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# The bundled teacher and student directories
# ---------------------------------------------------------------------------------------------

def tokenizer(chain: Chain):
    """A word-level tokenizer: ``<eos>`` (0, also pad) and ``t1 .. tN``, split on spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": EOS, **{f"t{i}": i for i in range(1, chain.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   model_max_length=chain.prompt_length + chain.max_response)


def build(out_dir, chain: Chain | None = None) -> None:
    """Write ``markov-teacher`` (order ``chain.order``, the chain's config) and ``markov-student``
    (order 1, drawn at load) into ``out_dir``: configs and tokenizers, no weights (both are
    built from their config)."""
    from pathlib import Path
    chain = chain or Chain()
    for name, config in (("markov-teacher", MarkovConfig(chain.vocab, chain.order, **chain.config())),
                         ("markov-student", MarkovConfig(chain.vocab, 1))):
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tokenizer(chain).save_pretrained(folder)
        meta_path = folder / "tokenizer_config.json"
        meta = json.loads(meta_path.read_text())
        meta["tokenizer_class"] = "PreTrainedTokenizerFast"  # loadable by older transformers too
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    from kdexp.assets import ASSETS
    build(ASSETS)
