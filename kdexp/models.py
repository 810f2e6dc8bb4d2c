"""Load students and teachers: any Hugging Face causal LM by hub name or local directory.

    model, tokenizer = load_model(cfg.student)          # AutoModelForCausalLM + AutoTokenizer
    vocab = shared_vocab(cfg, student, s_tok, teacher, t_tok)

A model spec (``student=`` / ``teacher=`` presets, see ``conf/config.yaml``) has
``name_or_path`` (hub name, local directory, or ``${kdexp.asset:NAME}`` for the bundled tiny
models), ``init`` (``pretrained``; ``random``: fresh weights from the model's config; ``auto``:
random for a directory that holds a config but no weights, like the bundled tiny student,
pretrained otherwise, so pointing ``name_or_path`` at a trained run's ``final/`` loads it),
``dtype``, ``revision``, ``trust_remote_code``, ``attn_implementation`` and ``lora``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kdexp import hub
from kdexp.assets import ASSETS, asset_path  # noqa: F401  (re-exported)
from kdexp.errors import UserError, unknown_choice
from kdexp.known import markov

log = logging.getLogger(__name__)
markov.register()  # the known teacher and student of `data=markov` (kdexp/known/markov.py)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _load_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": bool(spec.get("trust_remote_code", False))}
    if spec.get("revision"):
        kwargs["revision"] = spec["revision"]
    return kwargs


def _hub_error(what: str, spec: Mapping[str, Any], role: str, err: Exception) -> UserError:
    name = spec["name_or_path"]
    where = ("the local directory" if Path(str(name)).exists()
             else "the Hugging Face hub (not a local directory)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"could not load the {role} {what} '{name}' from {where}: {first}; "
                     f"set {role}.name_or_path to a local model directory")


def load_tokenizer(spec: Mapping[str, Any], role: str = "student"):
    """The model's tokenizer, with ``pad_token`` set to EOS when the model has none (GPT-2, LLaMA)."""
    hub.prepare(spec["name_or_path"], f"{role}.name_or_path")
    try:
        tok = AutoTokenizer.from_pretrained(spec["name_or_path"], **_load_kwargs(spec))
    except (OSError, ValueError) as err:
        raise _hub_error("tokenizer", spec, role, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json")
INITS = ("pretrained", "random", "auto")


def resolve_init(spec: Mapping[str, Any], role: str = "student") -> str:
    """``pretrained`` or ``random`` for a spec's ``init`` (``auto`` decided by the directory)."""
    init = spec.get("init", "pretrained")
    if init not in INITS:
        raise unknown_choice(f"{role}.init", init, INITS)
    if init != "auto":
        return init
    path = Path(str(spec["name_or_path"]))
    has_weights = not path.is_dir() or any(any(path.glob(p)) for p in WEIGHT_FILES)
    return "pretrained" if has_weights else "random"


def load_model(spec: Mapping[str, Any], role: str = "student", tokenizer=None,
               ) -> tuple[PreTrainedModel, Any]:
    """``(model, tokenizer)`` for a model spec; LoRA adapters added when ``lora.enabled``.

    With ``init: random`` the weights are drawn from the model's config under the current torch
    seed, so the caller seeds first. A ``tokenizer`` already loaded for this spec is reused.
    """
    if spec.get("name_or_path") in (None, "", "???"):
        raise UserError(f"{role}.name_or_path is not set; choose a preset ({role}=NAME) or a directory")
    if spec.get("dtype", "float32") not in DTYPES:
        raise unknown_choice(f"{role}.dtype", spec["dtype"], DTYPES)
    dtype = DTYPES[spec.get("dtype", "float32")]
    kwargs = _load_kwargs(spec)
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]
    if tokenizer is None:
        tokenizer = load_tokenizer(spec, role)  # which checks the name first (hub.prepare)
    else:
        hub.prepare(spec["name_or_path"], f"{role}.name_or_path")
    init = resolve_init(spec, role)
    bars = small_bars(weight_bytes(spec["name_or_path"]))
    try:
        if init == "random":
            config = AutoConfig.from_pretrained(spec["name_or_path"], **_load_kwargs(spec))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype if dtype != "auto" else None,
                                                     **{k: v for k, v in kwargs.items() if k != "revision"})
        else:
            with bars:
                model = AutoModelForCausalLM.from_pretrained(spec["name_or_path"], dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error("model", spec, role, err) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    lora = spec.get("lora") or {}
    if lora.get("enabled"):
        model = add_lora(model, lora)
    return model, tokenizer


def add_lora(model: PreTrainedModel, lora: Mapping[str, Any]):
    """Wrap ``model`` with PEFT LoRA adapters; only the adapters stay trainable.

    ``target_modules: null`` takes PEFT's default for the architecture (GPT-2's fused
    ``c_attn``, LLaMA / Qwen / OPT's ``q_proj`` and ``v_proj``).
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    # PEFT's default, named here: PEFT 0.21 loses it for Mixtral under transformers 5 (it targets nothing)
    targets = lora.get("target_modules") or DEFAULT_TARGETS.get(getattr(model.config, "model_type", None))
    config = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16)),
                        lora_dropout=float(lora.get("dropout", 0.0)), task_type="CAUSAL_LM",
                        target_modules=list(targets) if targets else None)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"LoRA: {err}; set student.lora.target_modules=[...]") from None


def model_identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What names a model's weights in a cache key: its name, revision and dtype, and for a local
    directory its files' names, sizes and modification times (standing for the weights)."""
    root = Path(str(spec["name_or_path"]))
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in root.iterdir()
                   if p.is_file()) if root.is_dir() else []
    return {"name_or_path": str(spec["name_or_path"]), "revision": spec.get("revision"),
            "dtype": spec.get("dtype"), "files": files}


BARS_FROM_BYTES = 2**30  # transformers' "Loading weights" / "Writing model shards" bars from 1 GiB on


def weight_bytes(name_or_path: str) -> int | None:
    """The size of a local model directory's weight files (None for a hub id: unknown here)."""
    path = Path(str(name_or_path))
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in path.glob(pattern))


@contextmanager
def small_bars(size: int | None):
    """transformers' loading and saving progress bars, off for weights under 1 GiB (they flash by
    in a fraction of a second and only clutter the console); unknown sizes keep them."""
    from transformers.utils import logging as hf_logging
    if size is None or size >= BARS_FROM_BYTES or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def vocab_rows(model: torch.nn.Module) -> int:
    """Number of rows of the output embedding (the logit dimension), padding included; the
    config's ``vocab_size`` for a model without one (the known teacher's table of logits)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def same_tokenizer(student_tok, teacher_tok, names: tuple[str, str]) -> None:
    """A one-line error unless the student and the teacher share one vocabulary."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(
            f"the student '{names[0]}' ({len(student_tok)} tokens) and the teacher '{names[1]}' "
            f"({len(teacher_tok)} tokens) use different tokenizers; token-level KD needs one "
            f"vocabulary: distil across tokenizers with loss.cross_tokenizer=span (or uld), or pick "
            f"a teacher and a student of the same model family")


def shared_vocab(student: torch.nn.Module, student_tok, teacher: torch.nn.Module, teacher_tok,
                 names: tuple[str, str]) -> int | None:
    """The logit width both models are compared on, or ``None`` when no slicing is needed.

    Token-level KD compares distributions position by position, so both models must share one
    tokenizer. Embedding matrices padded beyond the tokenizer (Qwen2.5-0.5B's 151936 rows and
    Qwen2.5-7B's 152064 for 151665 tokens), to different sizes or to the same one, are compared
    on the tokenizer's tokens: the padded rows are not tokens, and their probability mass would
    enter every divergence.
    """
    same_tokenizer(student_tok, teacher_tok, names)
    return logit_width(vocab_rows(student), vocab_rows(teacher), len(student_tok), "teacher")


def logit_width(rows_student: int, rows_teacher: int, n_tokens: int, what: str = "teacher") -> int | None:
    """``n_tokens`` when either model's logits are padded beyond the tokenizer (the width to
    slice both to), ``None`` when both have exactly its tokens (or more tokens than rows, both
    alike: nothing to slice); a one-line error when a model has fewer rows than tokens."""
    if rows_student == rows_teacher and n_tokens >= rows_student:
        return None
    if n_tokens > min(rows_student, rows_teacher):
        raise UserError(f"the tokenizer has {n_tokens} tokens but the student / {what} output "
                        f"{rows_student} / {rows_teacher} logits")
    log.info("the student's and the %s's logits (%d and %d rows) are compared on the %d tokens of the "
             "shared tokenizer; the padded rows are not tokens", what, rows_student, rows_teacher, n_tokens)
    return n_tokens


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts models: the router
# ---------------------------------------------------------------------------------------------

def router_shape(model: torch.nn.Module) -> tuple[int, int] | None:
    """``(experts, experts per token)`` of a Hugging Face MoE causal LM (Mixtral, Qwen-MoE,
    OLMoE, ...: their configs name them ``num_local_experts`` or ``num_experts`` and
    ``num_experts_per_tok``), or None for a dense model."""
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(experts), int(top_k)) if experts and top_k else None


def router_scoring(model: torch.nn.Module) -> str:
    """How the routers score the experts, when their outputs cannot say (:func:`route`): the
    config's ``scoring_func`` (DeepSeek's hub configs name it: ``softmax`` for V2, ``sigmoid``
    for V3; DeepSeek-V4's ``sqrtsoftplus``), else ``softmax`` (Mixtral, Qwen-MoE, OLMoE)."""
    return str(getattr(getattr(model, "config", None), "scoring_func", None) or "softmax")


def router_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router's distribution over the experts. [..., E] -> [..., E], summing to 1

    ``softmax``: the softmax of the logits (Shazeer et al., ICLR 2017). Otherwise the scores
    ``s = f(logits)`` normalized, ``s / sum(s)``: the affinities of DeepSeek-V3's sigmoid router
    over all experts, as its sequence-wise balance loss normalizes them (DeepSeek-AI, "DeepSeek-V3
    Technical Report", 2024, Eq. 19). The two are not on one scale: normalized sigmoids are far
    flatter than a softmax of the same logits, so entropies compare between routers of one
    scoring only."""
    logits = logits.double()
    if scoring == "softmax":
        return torch.softmax(logits, -1)
    from transformers.activations import ACT2FN

    scores = torch.sigmoid(logits) if scoring == "sigmoid" else ACT2FN[scoring](logits)
    return scores / scores.sum(-1, keepdim=True)


# The log of each scoring function's unnormalized score of an expert, from its logit.
LOG_SCORES = {"softmax": lambda x: x, "sigmoid": torch.nn.functional.logsigmoid}


def scoring_of(logits: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> str | None:
    """The scoring function that explains the weights a router gave the experts it chose, or
    None. [N, E], [N, k] x2

    A router weights its ``k`` chosen experts by their scores ``f(logit)``, possibly normalized
    over the ``k`` and scaled by a constant (Mixtral's softmax renormalized over the top k,
    DeepSeek-V3's sigmoids times ``routed_scaling_factor``): the ratios of two chosen experts'
    weights are the ratios of their scores either way, so ``log w_i - log w_1`` tells a softmax
    (``l_i - l_1``) from a sigmoid (``log sigmoid(l_i) - log sigmoid(l_1)``). Both fit where every
    chosen logit is far below 0 (``sigmoid(x) ~ e^x``): None then."""
    if chosen.shape[-1] < 2:
        return None
    w = weights.double().reshape(-1, chosen.shape[-1])
    picked = logits.double().reshape(w.shape[0], -1).gather(-1, chosen.reshape(w.shape).long())
    rows = (w > 0).all(-1)
    if not rows.any():
        return None
    log_w, picked = w[rows].log(), picked[rows]
    fits = [name for name, log_score in LOG_SCORES.items()
            if ((log_w - log_w[:, :1]) - (log_score(picked) - log_score(picked)[:, :1])).abs().max() < 1e-3]
    return fits[0] if len(fits) == 1 else None


@dataclass
class Routing:
    """An MoE model's routing of a batch, one row per MoE layer."""

    probs: torch.Tensor  # [L, B, T, E] the router's distribution over the experts (router_probs)
    chosen: torch.Tensor  # [L, B, T, k] the experts each token is sent to
    read: bool  # chosen as the routers chose them (else: the top k of probs, for every layer)
    scoring: str


def route(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Routing | None:
    """Every MoE layer's routing of a batch, as the model routes it; None for a model that
    returns no router logits.

    Hugging Face MoE models return their routers' logits when asked (``output_router_logits``,
    one ``[B * T, E]`` tensor per MoE layer). The experts a token is sent to are not always the
    top k of those logits: DeepSeek-V3's router adds a bias before choosing and keeps only the
    best groups of experts, DeepSeek-V2's keeps groups too. So forward hooks read each router's
    own output, the tuple that holds its logits, the ``[B * T, k]`` indices it chose and the
    weights it gave them (transformers >= 5's routers). The weights tell the scoring function
    (:func:`scoring_of`; where they cannot, :func:`router_scoring`). Where a layer's indices
    cannot be found, every layer falls back to the top k of its probabilities (``read`` is then
    False), which is the choice of a plain top-k router (Mixtral)."""
    shape = router_shape(model)
    if shape is None:
        return None
    experts, k = shape
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def keep(module, args, output) -> None:
        if not isinstance(output, tuple):
            return
        tensors = [t for t in output if torch.is_tensor(t) and t.dim() >= 1]
        chosen = [t for t in tensors if t.dtype in (torch.int64, torch.int32) and t.shape[-1] == k]
        weights = [t for t in tensors if t.is_floating_point() and t.shape[-1] == k != experts]
        if len(chosen) == 1:
            for t in tensors:
                if t.is_floating_point() and t.shape[-1] == experts:  # the tensor kept: its id stays its own
                    outputs[id(t)] = (t, chosen[0], weights[0] if len(weights) == 1 else None)

    handles = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    layers = getattr(out, "router_logits", None)
    if not layers:
        return None
    found = [outputs.get(id(r)) for r in layers]
    read = all(f is not None and f[0] is r for f, r in zip(found, layers, strict=True))
    told = {scoring_of(r, f[1], f[2]) if read and f[2] is not None else None for r, f in zip(layers, found, strict=True)}
    scoring = told.pop() if len(told) == 1 and None not in told else router_scoring(model)
    probs = torch.stack([router_probs(r.reshape(*input_ids.shape, -1), scoring) for r in layers])
    if read:
        chosen = torch.stack([f[1].reshape(*input_ids.shape, -1) for f in found])
    else:
        chosen = probs.topk(k, dim=-1).indices
    return Routing(probs.float(), chosen.long(), read, scoring)


class RouterLoss:
    """The load-balancing loss of an MoE student's training forward passes, as a loss term.

    Switch Transformer's auxiliary loss (Fedus, Zoph & Shazeer, JMLR 2022, Eq. 4), as Mixtral
    and Qwen-MoE compute it over top-k routing: ``E * sum_i f_i * P_i`` with ``f_i`` the
    assignments to expert ``i`` per token (the ``f_i`` sum to k) and ``P_i`` its mean router
    probability, over the non-padding tokens of the micro-batch and every layer; its value is
    ``k`` when the load is balanced. The model computes it when asked for its router logits:
    hooks ask for them in forward passes that build a graph (not in generation, where
    transformers' MoE models fail to compute it over a KV cache) and keep the value, which the
    step takes right after its own forward.
    """

    def __init__(self, model: torch.nn.Module, weight: float):
        self.weight = weight
        self.owner = type(model).__name__
        self.has_coef = hasattr(getattr(model, "config", None), "router_aux_loss_coef")
        self.value: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._ask, with_kwargs=True),
                        model.register_forward_hook(self._keep)]

    @staticmethod
    def _ask(module, args, kwargs):
        if torch.is_grad_enabled():
            kwargs["output_router_logits"] = True
        return args, kwargs

    def _keep(self, module, args, output) -> None:
        aux = getattr(output, "aux_loss", None)
        if aux is not None and torch.is_grad_enabled():
            self.value = aux

    def take(self) -> torch.Tensor:
        """The last training forward's loss (an error if the model gave none)."""
        value, self.value = self.value, None
        if value is None:
            if not self.has_coef:  # a model without the Switch-style loss (DeepSeek-V3 balances with a bias)
                raise UserError(f"train.router_aux_weight={self.weight:g}, but {self.owner} computes no load-balancing "
                                f"loss (its config has no router_aux_loss_coef): set train.router_aux_weight=0")
            raise RuntimeError("the MoE student's forward pass returned no load-balancing loss (aux_loss)")
        return value

    @classmethod
    def attach(cls, model: torch.nn.Module, setting: Any, sample_weight: str = "none") -> RouterLoss | None:
        """The term for ``train.router_aux_weight``: ``auto`` (the model config's
        ``router_aux_loss_coef`` for an MoE model, nothing for a dense one), a weight, or 0 (off).
        A weight for a dense model is an error; so is one with per-sequence sample weights,
        whose step-wide normalization rescales every gradient, this term's too."""
        shape = router_shape(model)
        if setting == "auto":
            weight = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) if shape else 0.0
        else:
            weight = float(setting)
            if weight and shape is None:
                raise UserError(f"train.router_aux_weight={setting}, but the student is not a mixture of experts "
                                f"({type(model).__name__} has no router): set train.router_aux_weight=auto")
        if weight > 0 and sample_weight != "none":
            raise UserError(f"method.sample_weight={sample_weight} rescales the whole step's gradient, and would "
                            f"rescale the MoE student's load-balancing loss with it: set train.router_aux_weight=0 "
                            f"(or method.sample_weight=none)")
        return cls(model, weight) if weight > 0 else None
