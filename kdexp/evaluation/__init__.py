"""Evaluation: generation metrics (ROUGE-L, exact match) and teacher-forced loss."""

from kdexp.evaluation.evaluate import evaluate_generation, format_table, teacher_forced_nll
from kdexp.evaluation.metrics import exact_match, normalize, rouge_l

__all__ = ["evaluate_generation", "exact_match", "format_table", "normalize", "rouge_l",
           "teacher_forced_nll"]
