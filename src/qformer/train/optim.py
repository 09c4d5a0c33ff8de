"""AdamW groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from qformer.train.config import OptimSpec

ENCODER_PREFIX = "vision."
EMBEDDINGS = ("patch_embedding", "class_embedding", "position_embedding")  # the EVA encoder's layer 0


def encoder_layer(name: str, num_layers: int) -> int:
    """The layer of an EVA encoder parameter (``name`` inside the encoder) as LAVIS's
    ``VisionTransformer.get_num_layer`` counts it: 0 for the patch, class and position
    embeddings, k + 1 for block k, ``num_layers`` for anything else."""
    if name.startswith(EMBEDDINGS):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_scales(num_layers: int, decay: float) -> list[float]:
    """LAVIS's ``lr_scales`` for an encoder of ``num_layers`` blocks: layer i's lr is scaled by
    ``decay ** (num_layers + 1 - i)``, i from 0 to ``num_layers + 1``."""
    return [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Weight decay on trainable parameters with 2+ dimensions (matrices, embeddings), none on
    biases, norms, the temperature; frozen parameters are left out. The first two groups
    (decay, no decay) hold everything at the full lr; with ``layer_decay`` < 1 a trained image
    encoder's parameters go in groups of their own by layer, each with its ``lr_scale``
    (:func:`layer_scales`)."""
    groups: dict[tuple[int | None, bool], list[nn.Parameter]] = {(None, True): [], (None, False): []}
    vision = getattr(model, "vision", None)
    num_layers = len(vision.layers) if layer_decay != 1 and vision is not None else 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = encoder_layer(name.removeprefix(ENCODER_PREFIX), num_layers) if (
            num_layers and name.startswith(ENCODER_PREFIX)) else None
        groups.setdefault((layer, param.ndim >= 2), []).append(param)
    scales = layer_scales(num_layers, layer_decay)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] is not None, item[0][0] or 0, not item[0][1]))
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": 1.0 if layer is None else scales[layer]} for (layer, decay), params in ordered]


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.AdamW:
    groups = parameter_groups(model, spec.weight_decay, spec.layer_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("nothing to train: every parameter is frozen")
    for group in groups:
        group["lr"] = spec.lr * group.pop("lr_scale")  # the schedule's factor multiplies it (LambdaLR)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def lr_factor(step: int, total: int, spec: OptimSpec) -> float:
    """Multiplier of ``spec.lr`` at ``step``: linear warmup, then cosine down to ``min_lr``, at
    every step or (``spec.epoch_steps``) once an epoch, as LAVIS's ``linear_warmup_cosine_lr``."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.epoch_steps:
        progress = (step // spec.epoch_steps) / math.ceil(total / spec.epoch_steps)
    else:
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    floor = spec.min_lr / spec.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, spec: OptimSpec):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, spec))
