"""What a method's data source may use during training: the models, the data, rollouts, and
randomness that every process shares.

Two kinds of randomness, kept apart on purpose:

* *decisions* (is this micro-batch student-generated? replay or fresh?) come from
  :meth:`Context.uniform`, a generator seeded by the run seed and the position in training
  (step, micro-batch, tag), never by the rank: every process draws the same number, so
  processes never disagree on which branch to take (a per-rank coin desynchronizes
  distributed training, e.g. when one rank generates and the other does not);
* *samples* (the tokens of a rollout) come from :meth:`Context.generator`, seeded by the
  same position *and* the rank, so ranks sample different responses for their own prompts.

Both are pure functions of the position, so a resumed run draws exactly what the
uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kdexp.data.encode import Example
from kdexp.engine import plain_model
from kdexp.files import write_atomic
from kdexp.rollout import RolloutSpec, sample

if TYPE_CHECKING:
    from kdexp.teachers import Teacher

log = logging.getLogger(__name__)


def stable_seed(*key: object) -> int:
    """A 63-bit seed from any tuple of ints and strings, the same in every process and run."""
    digest = hashlib.sha256(json.dumps([str(k) for k in key]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Context:
    """The run as a method sees it. ``student`` is the engine-wrapped model being trained."""

    def __init__(self, cfg: DictConfig, accelerator, student: torch.nn.Module, teacher: Teacher,
                 tokenizer, train: Sequence[Example], max_steps: int, engine: torch.nn.Module | None = None,
                 optimizer: Any = None, stream: Any = None):
        self.cfg, self.accelerator, self.optimizer, self.stream = cfg, accelerator, optimizer, stream
        self.engine = engine if engine is not None else student  # what accelerate prepared
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.train, self.max_steps = train, max_steps
        self.spec = RolloutSpec.from_cfg(OmegaConf.to_container(cfg.rollout, resolve=True))
        self.seed = int(cfg.seed)
        self.max_length = int(cfg.data.max_length)
        self._drawn: list[float] = []  # this step's decisions, compared across ranks
        self.step = 0  # the optimizer steps taken (set by the loop): when a vLLM engine loads new weights
        self.vllm = None
        if (cfg.rollout.get("engine") or "hf") == "vllm":
            from kdexp.rollout_vllm import VllmRollouts

            self.vllm = VllmRollouts(cfg, tokenizer, teacher.vocab)

    @property
    def vocab(self) -> int | None:
        """The logit width student and teacher are compared on (``None``: as they are)."""
        return self.teacher.vocab

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    # -- randomness ---------------------------------------------------------------------------

    def uniform(self, *key: object, n: int | None = None) -> Any:
        """A decision in [0, 1) (or ``n`` of them), identical on every process."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, "decision", *key))
        draws = torch.rand(n or 1, generator=g, dtype=torch.float64).tolist()
        self._drawn.extend(draws)
        return draws if n is not None else draws[0]

    def check_decisions(self, step: int) -> None:
        """Fail loudly if the processes drew different decisions since the last call.

        Called once per step by the loop when there is more than one process: one small
        gather, cheap next to a step. Every rank must have drawn the same number of decisions
        with the same values; otherwise some rank took another branch (generated when the
        others did not) and the run is no longer the method it claims to be.
        """
        drawn, self._drawn = self._drawn, []
        if self.world == 1:
            return
        digest = torch.tensor([[float(len(drawn)), float(sum(drawn))]], dtype=torch.float64,
                              device=self.accelerator.device)
        every = self.accelerator.gather(digest).cpu()
        if not torch.equal(every, every[:1].expand_as(every)):
            raise RuntimeError(f"processes drew different batch-source decisions at step {step} "
                               f"(count, sum per rank: {every.tolist()}); decisions must come from "
                               "Context.uniform, which every rank draws alike")

    def generator(self, *key: object, shared: bool = False) -> torch.Generator:
        """The sampling generator for ``key``: this process's own, or (``shared``) the one
        every process and a one-process run get for that key."""
        device = self.accelerator.device
        g = torch.Generator(device=device if device.type == "cuda" else "cpu")
        return g.manual_seed(stable_seed(self.seed, "sample", 0 if shared else self.rank, *key))

    def slot(self, micro: int) -> int:
        """The position of this process's micro-batch ``micro`` among all the micro-batches of
        the step, as :class:`kdexp.train.BatchStream` deals them out: the index a one-process
        run with the same global batch gives the same examples."""
        return micro * self.world + self.rank

    def micro_rollout(self, examples: Sequence[Example], name: str, step: int, micro: int,
                      **kwargs: Any) -> list[Example]:
        """:meth:`rollout` for micro-batch ``micro`` of ``step``, seeded by its examples' place
        in the global batch, not by the process: 2 processes sample what 1 process samples."""
        return self.rollout(examples, name, step, self.slot(micro), shared=True, **kwargs)

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (``x`` itself with one process); every rank calls it."""
        if self.world == 1:
            return x
        return self.accelerator.reduce(x.to(self.accelerator.device), "sum").to(x.device)

    def permutation(self, n: int, *key: object) -> list[int]:
        """A permutation of ``range(n)`` shared by every process."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, "perm", *key))
        return torch.randperm(n, generator=g).tolist()

    # -- rollouts -----------------------------------------------------------------------------

    def unwrapped_student(self) -> AbstractContextManager[torch.nn.Module]:
        """The plain student, dropout off, its full parameters present (gathered under ZeRO-3)."""
        return plain_model(self.accelerator, self.student, self.engine)

    def rollout(self, examples: Sequence[Example], *key: object, model: str = "student",
                teacher_mix: float = 0.0, spec: RolloutSpec | None = None, shared: bool = False,
                score_teacher: bool = False, desc: str | None = None) -> list[Example]:
        """``examples`` with their responses replaced by samples of ``model`` (``student``,
        ``teacher``, or the student mixed with the teacher at ``teacher_mix``).

        Student samples carry ``logq_old`` (the student's log-probability of each token when
        it was sampled) and ``logp_sampler`` (the sampling distribution's), for importance
        weights and policy-gradient ratios; with ``score_teacher``, also ``logp_teacher`` (the
        teacher's log-probability of each token, for rewards). ``desc``: show a progress bar
        (on the main process) for a long pass such as a whole training split.
        """
        spec = spec or self.spec
        if model == "teacher" and self.teacher.generates_remotely:  # a served teacher: its server generates
            return self._remote_rollout(examples, spec, stable_seed(self.seed, "sample", 0 if shared else self.rank,
                                                                   *key))
        policy = self.unwrapped_student() if model == "student" else self.teacher.model()
        out: list[Example] = []
        size = int(self.cfg.rollout.batch_size)
        g = self.generator(*key, shared=shared)
        # a vLLM engine samples the student alone (a teacher mix or score needs both models per token)
        engine = self.vllm if model == "student" and not (teacher_mix > 0 or score_teacher) else None
        seed = stable_seed(self.seed, "vllm", 0 if shared else self.rank, *key)
        mixing = self.teacher.model() if teacher_mix > 0 or score_teacher else nullcontext()
        starts = range(0, len(examples), size)
        if desc:
            starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=not self.accelerator.is_main_process)
        with policy as plain, mixing as mix, torch.no_grad():
            for start in starts:
                chunk = examples[start:start + size]
                if engine is not None:
                    samples = engine.sample(plain, [e.prompt_ids for e in chunk], spec, seed + start, self.step)
                else:
                    samples = sample(plain, [e.prompt_ids for e in chunk], spec, self.tokenizer.eos_token_id,
                                     self.tokenizer.pad_token_id, g, teacher=mix, teacher_mix=teacher_mix,
                                     vocab=self.vocab, score_teacher=score_teacher)
                for e, s in zip(chunk, samples, strict=True):
                    room = max(1, self.max_length - len(e.prompt_ids))
                    values = ({"logq_old": s.logp_student[:room], "logp_sampler": s.logp_sampler[:room]}
                              if model == "student" else {})
                    if s.logp_teacher is not None:
                        values["logp_teacher"] = s.logp_teacher[:room]
                    out.append(e.with_response(s.response_ids[:room], model, values))
        return out

    def _remote_rollout(self, examples: Sequence[Example], spec: RolloutSpec, seed: int) -> list[Example]:
        """Teacher responses generated by the teacher's server, ``rollout.batch_size`` prompts a
        request, each request seeded from ``seed`` and its place."""
        out: list[Example] = []
        size = int(self.cfg.rollout.batch_size)
        stops = [self.tokenizer.eos_token_id, *spec.stop_ids]
        for start in range(0, len(examples), size):
            chunk = examples[start:start + size]
            responses = self.teacher.generate([e.prompt_ids for e in chunk], spec, stops, seed + start)
            for e, response in zip(chunk, responses, strict=True):
                room = max(1, self.max_length - len(e.prompt_ids))
                out.append(e.with_response(response[:room], "teacher", {}))
        return out

    def rollout_all(self, examples: Sequence[Example], *key: object, model: str = "student",
                    spec: RolloutSpec | None = None, desc: str | None = None) -> list[Example]:
        """Responses for every example, the work split over the processes, every process
        getting the whole list back (in order); a progress bar titled ``desc``."""
        per = -(-len(examples) // self.world)
        mine = examples[self.rank * per:(self.rank + 1) * per]
        done = self.rollout(mine, *key, model=model, spec=spec, desc=desc)
        if self.world == 1:
            return done
        return list(gather_object(done))

    # -- the teacher-output cache ---------------------------------------------------------------

    def cached_teacher_outputs(self, spec: RolloutSpec) -> list[Example]:
        """The teacher's responses to every training prompt, generated once and kept on disk
        under ``rollout.cache_dir`` (keyed by teacher, prompts, sampling parameters and, for
        sampled outputs, the seed), so runs that differ in anything else (loss, method, the
        seed of greedy outputs, ...) reuse them."""
        key = self._cache_key(spec)
        path = Path(self.cfg.rollout.cache_dir) / f"teacher-outputs-{key}.jsonl"
        if not path.is_file():
            log.info("generating teacher outputs for %d prompts (cached at %s)", len(self.train), path)
            outputs = self.rollout_all(self.train, "teacher-outputs", model="teacher", spec=spec,
                                       desc="teacher outputs")
            if self.accelerator.is_main_process:  # atomic: a reader sees the whole cache or none
                write_atomic(path, "".join(json.dumps(e.response_ids) + "\n" for e in outputs))
            self.accelerator.wait_for_everyone()
            return outputs
        lines = path.read_text().splitlines()
        if len(lines) != len(self.train):
            raise RuntimeError(f"{path} holds {len(lines)} responses for {len(self.train)} prompts; delete it")
        log.info("teacher outputs loaded from %s", path)
        return [e.with_response(json.loads(line), "teacher") for e, line in zip(self.train, lines, strict=True)]

    def _cache_key(self, spec: RolloutSpec) -> str:
        from kdexp.models import model_identity
        teacher = self.teacher.identity() or model_identity(self.cfg.teacher)
        prompts = hashlib.sha256(json.dumps([e.prompt_ids for e in self.train]).encode()).hexdigest()
        blob = json.dumps({"teacher": teacher["name_or_path"], "revision": teacher["revision"],
                           "dtype": teacher["dtype"], "weights": teacher["files"], "prompts": prompts,
                           "spec": repr(spec), "max_length": self.max_length,
                           # greedy outputs do not depend on the seed: every seed's runs share them
                           "seed": self.seed if spec.do_sample else None,
                           "world": self.world}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
