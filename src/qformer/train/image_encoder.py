"""The image encoder in fine-tuning: frozen (BLIP-2's pre-training, InstructBLIP) or trained
(BLIP-2's COCO caption, VQA and retrieval fine-tuning, LAVIS's ``freeze_vit: False``)."""

from __future__ import annotations

import logging

import torch

from qformer.models.blip2 import Blip2Base
from qformer.models.vision import EvaViT
from qformer.train.config import ModelSpec

logger = logging.getLogger(__name__)


def prepare_image_encoder(model: Blip2Base, spec: ModelSpec) -> None:
    """With ``model.freeze_vit: false``, the EVA encoder trains: its weights in fp32 (the
    master weights ``precision``'s autocast computes from, as LAVIS's ``vit_precision: fp32``;
    ``config.vision_dtype`` says so in what is saved), each block recomputed in backward when
    ``spec.encoder_checkpointing``. Frozen, it is left as the model was built."""
    if spec.freeze_vit:
        return
    if not isinstance(model.vision, EvaViT):
        found = "no image encoder (image features)" if model.vision is None else type(model.vision).__name__
        raise ValueError(f"model.freeze_vit: false trains the EVA image encoder; this model has {found}")
    model.vision.to(torch.float32)
    model.vision.requires_grad_(True)
    model.vision.gradient_checkpointing = spec.encoder_checkpointing
    model.config = model.config.replace(vision_dtype="float32")
    count = sum(p.numel() for p in model.vision.parameters())
    logger.info("image encoder trains (%s parameters, fp32%s)", f"{count:,}",
                ", blocks recomputed in backward" if spec.encoder_checkpointing else "")
