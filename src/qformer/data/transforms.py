"""BLIP-2's image preprocessing with Pillow and NumPy (no torchvision)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from qformer.config import ImageConfig


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image from a path or a PIL image; a file that is not an image fails naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {image}: {err}") from err


def eval_transform(images: Sequence[str | Path | Image.Image], config: ImageConfig) -> Tensor:
    """Bicubic resize to ``config.size`` square, scale to [0, 1], normalise: (B, 3, S, S)."""
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    arrays = []
    for image in images:
        resized = load_image(image).resize((config.size, config.size), Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (S, S, 3)
        arrays.append(((pixels - mean) / std).transpose(2, 0, 1))  # (3, S, S)
    return torch.from_numpy(np.stack(arrays))
