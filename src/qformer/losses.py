"""Losses, fed with model outputs (never with raw batches or a tokenizer)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def causal_lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Next-token cross-entropy: position t predicts label t + 1; ``IGNORE_INDEX`` is skipped.

    logits (B, T, V), labels (B, T) aligned with the inputs (not shifted by the caller).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the text positions {tuple(logits.shape[:2])}")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T - 1), V)
    targets = labels[:, 1:].reshape(-1).to(shifted.device)  # (B * (T - 1),)
    return F.cross_entropy(shifted.float(), targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
