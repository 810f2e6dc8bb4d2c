"""Generation metrics: ROUGE-L and exact match, each the max over a prediction's references, x100.

ROUGE-L is the F-measure of ``rouge_score.rouge_scorer.RougeScorer(['rougeL'],
use_stemmer=True)`` (Lin, "ROUGE", ACL workshop 2004), as in MiniLLM's and DistiLLM's
evaluation scripts. Exact match compares texts after lowercasing, removing ASCII punctuation
and collapsing whitespace.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

_PUNCT = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace: ``" Hello,  World! "`` -> ``"hello world"``."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalized prediction equals any normalized reference, else 0."""
    pred = normalize(prediction)
    return 100.0 * any(pred == normalize(ref) for ref in references)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure of ``prediction`` against ``references``, x100 (0 without references)."""
    return 100.0 * max((_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references),
                       default=0.0)
