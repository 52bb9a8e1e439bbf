"""Evaluation: benchmark metrics with the official definitions (:mod:`qwenvl.eval.metrics`)."""

from qwenvl.eval.metrics import (
    cider,
    exact_match,
    grounding_accuracy,
    normalize_vqa_answer,
    ptb_tokenize,
    relaxed_correctness,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "cider",
    "exact_match",
    "grounding_accuracy",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "relaxed_correctness",
    "vqa_accuracy",
    "vqa_score",
]
