"""The interface of the teacher side: what the loop and the methods may ask of a teacher.

The training loop holds one :class:`Teacher` and never asks which kind it is. Each kind
answers the same questions:

* the engine: which module accelerate trains (the student, or the student together with a
  teacher that trains too), which parameter groups the teacher adds to the optimizer (none
  for a frozen teacher), what must happen once the engine is prepared (ZeRO-3 partitions a
  frozen teacher);
* a micro-batch: the extra inputs it needs next to the token ids (a cache's row indices), and
  the student's and the teacher's logits on it (:meth:`Teacher.forward`); the teacher's alone
  (:meth:`Teacher.distributions`), e.g. to score a reward;
* sampling and generation: a plain model that gives next-token logits (:meth:`Teacher.model`),
  for teacher outputs (SeqKD, DistiLLM-2) and MiniLLM's teacher-mixed rollouts;
* the end of the run: what it saves beside the student, and the model the final evaluation
  scores.

A kind is a subclass registered in :data:`kdexp.teachers.SOURCES` under the name of
``teacher.source``; a served teacher, several teachers combined, or a teacher with another
tokenizer is a new subclass, and the loop does not change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from kdexp.engine import gathered_params
from kdexp.losses.fused import Dense, Head, identity

Logits = torch.Tensor  # [B, T, V], the positions of the micro-batch's sequences


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab: int | None) -> Logits:
    """``model``'s logits on the batch's sequences, cut to the compared width ``vocab``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out if vocab is None else out[..., :vocab]


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when it is a plain ``nn.Linear`` (not LoRA-wrapped) with a weight,
    else None. Under ZeRO-3 its weight is a shard here (:func:`kdexp.engine.gathered_params`
    gathers it)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or (head.weight.numel() == 0 and not hasattr(head.weight, "ds_id")):
        return None
    return head


@contextmanager
def bare_heads(*heads: torch.nn.Linear) -> Iterator[None]:
    """While inside, each head returns its input: a forward of its model (through any engine
    wrapper, whose hooks still run) gives the final hidden states where the logits were. A
    ``forward`` set on the instance before (an accelerate hook) is put back after."""
    unique = list({id(h): h for h in heads}.values())
    before = [h.__dict__.get("forward") for h in unique]
    for head in unique:
        head.forward = identity
    try:
        yield
    finally:
        for head, forward in zip(unique, before, strict=True):
            if forward is None:
                del head.forward
            else:
                head.forward = forward


# Config entries of models that transform their logits after the head (Gemma-2's soft-capping,
# Granite's scaling, Cohere's scale): such a model keeps the plain path whatever its values.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def linear_head(model: torch.nn.Module) -> tuple[torch.nn.Linear | None, str]:
    """The model's head if its logits are exactly ``head(final hidden states)``, else None and
    why: a model whose config names a transform of its logits (:data:`LOGIT_TRANSFORMS`) is
    refused, and the rest are checked once on four tokens, so that a model that scales or caps
    its logits after the head keeps the plain path."""
    head = output_head(model)
    if head is None:
        return None, f"{type(model).__name__} has no plain linear LM head (LoRA on it, or none)"
    config = getattr(model, "config", None)
    transforms = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if transforms:
        return None, f"{type(model).__name__} transforms its logits after the LM head ({', '.join(transforms)})"
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.arange(1, 5, device=head.weight.device)[None] % head.out_features
            logits = model(input_ids=ids).logits
            with bare_heads(head):
                hidden = model(input_ids=ids).logits
    finally:
        for m, training in modes.items():
            m.training = training
    # The forward may run under the engine's autocast (accelerate wraps it, and may hand the
    # logits back in float32): the head applied in float32 must agree with the logits to 2 %
    # of their norm, which bf16 / fp16 rounding meets (about 0.4 %) and a transform does not.
    if hidden.shape[-1] != head.in_features:
        return None, f"{type(model).__name__}'s hidden states do not match its LM head"
    with gathered_params(head.weight, head.bias):
        bias = None if head.bias is None else head.bias.float()
        error = (F.linear(hidden.float(), head.weight.float(), bias) - logits.float()).norm()
    if not error <= 2e-2 * logits.float().norm():
        return None, f"{type(model).__name__} transforms its logits after the LM head"
    return head, ""


def clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Teacher:
    """No teacher: a method that needs none (SFT) and evaluates none. The base of every kind.

    ``vocab``: the logit width student and teacher are compared on (``None``: the logits as
    they are). ``seconds``: the time spent computing teacher distributions for the loss,
    reported per step as ``train/teacher_s``. ``student_part``: the attribute of the engine's
    model that is the student (``None``: the engine's model is the student).
    """

    kind = "none"
    student_part: str | None = None
    remote = False  # its micro-batch inputs come over a network and can fail (TeacherError)

    def __init__(self, accelerator, vocab: int | None = None):
        self.accelerator, self.vocab = accelerator, vocab
        self.seconds = 0.0

    def total_seconds(self) -> float:
        """``seconds``, with those of the teachers it is made of (several teachers)."""
        return self.seconds

    # -- the engine -------------------------------------------------------------------------

    def engine_module(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the engine trains: the student alone, unless the teacher trains too."""
        return student

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """The teacher's trainable parameters and their learning rate, one group each."""
        return []

    def prepared(self, engine: torch.nn.Module) -> torch.nn.Module:
        """Called once the engine is prepared; returns the student as the loop trains it."""
        return engine

    # -- a micro-batch ----------------------------------------------------------------------

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        """Tensors the teacher needs in the micro-batch of ``examples``, beside the tokens."""
        return {}

    def forward(self, engine: torch.nn.Module, batch: dict[str, torch.Tensor],
                wanted: bool) -> tuple[Logits, Logits | None]:
        """The student's logits (with their gradient) and, when ``wanted``, the teacher's."""
        student = logits_of(engine, batch, self.vocab)
        if not wanted:
            return student, None
        started = clock(self.accelerator.device)
        teacher = self.distributions(batch)
        self.seconds += clock(self.accelerator.device) - started
        return student, teacher

    # -- the fused path (kdexp.losses.fused) ------------------------------------------------

    def fusable(self, engine: torch.nn.Module) -> str:
        """Why the fused path cannot run here ("" when it can): every model whose logits the
        loss reads must expose a plain linear head. Called once, before training."""
        self._head, why = linear_head(self.accelerator.unwrap_model(engine))
        return why

    def forward_fused(self, engine: torch.nn.Module, batch: dict[str, torch.Tensor],
                      wanted: bool) -> tuple[Head, Head | Dense | None]:
        """:meth:`forward` as hidden states and heads: no ``[B, T, V]`` logits are built."""
        with bare_heads(self._head):
            hidden = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = Head(hidden, self._head.weight, self._head.bias, self.vocab)
        if not wanted:
            return student, None
        started = clock(self.accelerator.device)
        teacher = self.fused_distributions(batch)
        self.seconds += clock(self.accelerator.device) - started
        return student, teacher

    def fused_distributions(self, batch: dict[str, torch.Tensor]):
        """The teacher for the fused path: its hidden states and head where it has them."""
        return Dense(self.distributions(batch))

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        """The teacher's logits at every position of the batch's sequences (no gradient);
        ``autocast``: under the run's mixed precision (as for the loss), else in the model's
        own dtype (as rewards are scored)."""
        raise RuntimeError("the teacher's distributions were asked for but this run has no teacher")

    # -- sampling and generation ------------------------------------------------------------

    # Whether the teacher's responses come from :meth:`generate` (a server) rather than from
    # sampling :meth:`model` in this process.
    generates_remotely = False

    def identity(self) -> dict | None:
        """What names the teacher in the keys of caches of its outputs when it is not the
        ``teacher=`` model loaded here (a server: its URL and model); ``None``: that model."""
        return None

    def generate(self, prompts: list[list[int]], spec, stop_ids: list[int], seed: int) -> list[list[int]]:
        """Responses to ``prompts`` (token ids, each ending at its first stop token, kept) where
        :attr:`generates_remotely`."""
        raise RuntimeError(f"a {self.kind} teacher does not generate remotely")

    @contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        """A plain model in eval mode, whole (gathered under ZeRO-3), for sampling."""
        raise RuntimeError("a teacher rollout was requested but this run has no teacher model")
        yield  # pragma: no cover

    # -- the end of the run -----------------------------------------------------------------

    def save(self, engine: torch.nn.Module, run_dir: Path) -> None:
        """Save what the teacher learned beside the student (every process calls it)."""

    def gathered(self) -> list[torch.nn.Module]:
        """The teacher modules whose parameters the final evaluation must gather (ZeRO-3)."""
        return []

    def evaluated(self) -> torch.nn.Module | None:
        """The plain model the final evaluation scores, or ``None``."""
        return None

    # The evaluated model is the teacher as loaded (not trained in the run), so its evaluation
    # can be shared by every run with the same teacher and settings (kdexp.jobs.evaluate).
    evaluated_as_loaded = False
