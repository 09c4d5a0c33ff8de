"""Evaluation metrics: VQAv2 accuracy and COCO caption metrics.

The caption metrics import ``pycocoevalcap`` only when called, so the VQA metrics work without it.
"""

from qformer.evaluate.captions import DEFAULT_METRICS, KNOWN_METRICS, caption_metrics, exact_match
from qformer.evaluate.vqa import normalize_answer, vqa_accuracy, vqa_score

__all__ = [
    "DEFAULT_METRICS",
    "KNOWN_METRICS",
    "caption_metrics",
    "exact_match",
    "normalize_answer",
    "vqa_accuracy",
    "vqa_score",
]
