"""Token-level divergences between a teacher distribution p and a student distribution q.

Every divergence here is a pure function
``(student_logits [..., V], teacher_logits [..., V], *, temperature, ...) -> [...]``:
both softmaxes are taken over ``logits / temperature`` in float32, the result is summed over
the vocabulary, and nothing is masked or averaged. Masks, weights and the normalization by
the global number of tokens happen once, in :mod:`kdexp.losses.objective`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdexp.registry import Registry

DIVERGENCES: Registry = Registry("loss")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` in float32. [..., V] -> [..., V]"""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), with 0 log 0 = 0. [..., V] -> [...]

    The difference is zeroed where p = 0 *before* the product, so that a -inf in an
    unselected entry cannot turn the gradient into NaN (the classic ``torch.where`` trap).
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


@DIVERGENCES.register("fkl", description="forward KL(p || q): mode covering (Hinton et al., 2015)")
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, KL(p_teacher || q_student), per position. [..., V] x [..., V] -> [...]

    The classic token-level KD objective (Hinton, Vinyals & Dean, "Distilling the Knowledge in
    a Neural Network", NIPS DL workshop 2015; Kim & Rush, EMNLP 2016, Eq. 5 for sequences).
    """
    return kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


@DIVERGENCES.register("rkl", description="reverse KL(q || p): mode seeking (Gu et al., ICLR 2024)")
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL, KL(q_student || p_teacher), per position. [..., V] x [..., V] -> [...]

    Token-level reverse KL as used for LLM distillation by MiniLLM (Gu, Dong, Wei & Huang,
    "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024, Eq. 1) and GKD
    (Agarwal et al., ICLR 2024, Sec. 3).
    """
    return kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))
