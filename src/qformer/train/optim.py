"""AdamW groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from qformer.train.config import OptimSpec


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on trainable parameters with 2+ dimensions (matrices, embeddings), none on
    biases, norms, the temperature; frozen parameters are left out."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.AdamW:
    groups = parameter_groups(model, spec.weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def lr_factor(step: int, total: int, spec: OptimSpec) -> float:
    """Multiplier of ``spec.lr`` at ``step``: linear warmup, then cosine down to ``min_lr``."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    floor = spec.min_lr / spec.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, spec: OptimSpec):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, spec))
