"""Batching for BLIP-2 training: stack images, tokenise text (with
:func:`qformer.tokenizer.tokenize_texts`, as inference does), and count the samples a dataset
skipped (None or ``Skipped``), also when they were read in workers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from qformer.data.datasets import Sample, Skipped, skipped_count
from qformer.tokenizer import tokenize_texts

Batch = dict[str, Any]


def _split_skipped(samples: Sequence[Sample | Skipped | None]) -> tuple[list[Sample], int]:
    """The readable samples and how many were skipped (a ``Skipped`` may stand for several)."""
    kept = [sample for sample in samples if sample is not None and not isinstance(sample, Skipped)]
    return kept, skipped_count(samples)


class CaptionCollator:
    """Caption samples -> ``pixel_values`` (B, 3, S, S), right-padded ``input_ids`` and
    ``attention_mask`` (B, T), ``image_ids`` (B,), ``texts`` and ``skipped``. When every sample
    was skipped, the tensors are None and ``texts`` is empty. ``pad_to_max_length`` gives every
    batch the same T, which gathering token ids across processes needs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 32, pad_to_max_length: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = "max_length" if pad_to_max_length else "longest"

    def __call__(self, samples: Sequence[Sample | Skipped | None]) -> Batch:
        kept, skipped = _split_skipped(samples)
        if not kept:
            return {
                "pixel_values": None,
                "input_ids": None,
                "attention_mask": None,
                "image_ids": None,
                "texts": [],
                "skipped": skipped,
            }
        texts = [sample["text"] for sample in kept]
        tokens = tokenize_texts(self.tokenizer, texts, self.max_length, "right", self.padding)
        return {
            "pixel_values": torch.stack([sample["image"] for sample in kept]),  # (B, 3, S, S)
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_ids": torch.tensor([sample["image_id"] for sample in kept], dtype=torch.long),
            "texts": texts,
            "skipped": skipped,
        }


class VQACollator:
    """VQA samples -> ``pixel_values`` (B, 3, S, S), ``prompts`` (the questions in ``prompt``)
    tokenised as ``input_ids`` and ``attention_mask`` (B, T), ``questions``, ``answers`` and
    ``weights`` (lists of lists), ``question_ids`` and ``skipped``. Prompts are right-padded
    unless ``padding_side="left"`` (for a decoder-only LLM that generates after them). When
    every sample was skipped, the tensors are None and the lists empty."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt: str = "Question: {} Answer:",
        max_length: int = 32,
        padding_side: str = "right",
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_length = max_length
        self.padding_side = padding_side

    def __call__(self, samples: Sequence[Sample | Skipped | None]) -> Batch:
        kept, skipped = _split_skipped(samples)
        questions = [sample["question"] for sample in kept]
        prompts = [self.prompt.format(question) for question in questions]
        batch: Batch = {
            "pixel_values": None,
            "input_ids": None,
            "attention_mask": None,
            "prompts": prompts,
            "questions": questions,
            "answers": [sample["answers"] for sample in kept],
            "weights": [sample["weights"] for sample in kept],
            "question_ids": [sample["question_id"] for sample in kept],
            "skipped": skipped,
        }
        if kept:
            tokens = tokenize_texts(self.tokenizer, prompts, self.max_length, self.padding_side)
            batch["pixel_values"] = torch.stack([sample["image"] for sample in kept])  # (B, 3, S, S)
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        return batch
