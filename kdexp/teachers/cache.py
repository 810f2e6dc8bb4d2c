"""The teacher read from a cache on disk (``teacher.source=cache``) of its top-k
log-probabilities or of draws from it, built beforehand by ``kdexp cache-teacher``
(:mod:`kdexp.teacher_cache`): no teacher model is loaded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdexp.errors import UserError
from kdexp.losses.fused import Sparse
from kdexp.losses.sampled import Sampled
from kdexp.models import logit_width, vocab_rows
from kdexp.teacher_cache import TeacherCache
from kdexp.teachers.base import Logits, Teacher


class CachedTeacher(Teacher):
    """Each training sequence's top-k teacher log-probabilities and its tail's share, rebuilt
    into logits at the target positions (:meth:`kdexp.teacher_cache.TeacherCache.logits`); or,
    from a sampled cache, its draws (:class:`kdexp.losses.sampled.Sampled`), which the loss
    reads through each divergence's unbiased estimate.

    It serves the methods that train on the dataset text; a method that samples from the
    teacher or generates with it is refused before the run starts (``train.check_config``).
    """

    kind = "cache"

    def __init__(self, accelerator, cache: TeacherCache, student: torch.nn.Module, tokenizer):
        rows = vocab_rows(student)
        # as kdexp.models.shared_vocab: the tokenizer's tokens when either side is padded
        vocab = logit_width(rows, cache.vocab, len(tokenizer), "cached teacher")
        if cache.kind == "topk" and (vocab or rows) < cache.top_k:
            raise UserError(f"the teacher cache holds top-{cache.top_k} entries but the student has "
                            f"{vocab or rows} logits")
        super().__init__(accelerator, vocab)
        self.cache, self.width = cache, vocab or rows

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        return {"cache_rows": self.cache.row_indices(examples)}

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits | Sampled:
        if self.cache.kind == "sampled":
            return self.cache.sampled(batch["cache_rows"], batch["targets"]).positions()
        return self.cache.logits(batch["cache_rows"], batch["targets"], self.width)

    def fused_distributions(self, batch: dict[str, torch.Tensor]) -> Sparse | Sampled:
        if self.cache.kind == "sampled":
            return self.cache.sampled(batch["cache_rows"], batch["targets"])
        return self.cache.sparse(batch["cache_rows"], batch["targets"], self.width)
