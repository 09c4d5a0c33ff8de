"""BLIP-2's image preprocessing and text cleaning with Pillow and NumPy (no torchvision)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from qformer.config import ImageConfig

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_TRIES = 10
_CAPTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def load_image(image: str | Path | BinaryIO | Image.Image) -> Image.Image:
    """An RGB image from a path, an open binary file or a PIL image; a file that is not an
    image fails naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {image}: {err}") from err


def _normalise(image: Image.Image, config: ImageConfig) -> Tensor:
    """Bicubic resize to ``config.size`` square, scale to [0, 1], normalise: (3, S, S)."""
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    resized = image.resize((config.size, config.size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (S, S, 3)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())  # (3, S, S)


def eval_image(image: str | Path | Image.Image, config: ImageConfig) -> Tensor:
    """One image preprocessed for evaluation: (3, S, S)."""
    return _normalise(load_image(image), config)


def eval_transform(images: Sequence[str | Path | Image.Image], config: ImageConfig) -> Tensor:
    """Bicubic resize to ``config.size`` square, scale to [0, 1], normalise: (B, 3, S, S)."""
    return torch.stack([eval_image(image, config) for image in images])


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """A crop box ``(left, top, right, bottom)`` as RandomResizedCrop draws it: an area fraction
    uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``, up to 10 tries; when none
    fits, the largest centred box whose aspect ratio is clamped into ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return left, top, left + crop_w, top + crop_h
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def train_transform(image: Image.Image, config: ImageConfig, rng: random.Random) -> Tensor:
    """BLIP-2's training augmentation: random resized crop (scale 0.5-1, ratio 3/4-4/3, bicubic
    to ``config.size``), horizontal flip with p=0.5, scale to [0, 1], normalise: (3, S, S).
    Deterministic given ``rng``."""
    image = load_image(image)
    cropped = image.crop(random_resized_crop_box(image.width, image.height, rng))
    if rng.random() < 0.5:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _normalise(cropped, config)


class TrainTransform:
    """``train_transform`` as a one-argument dataset transform.

    Its rng is seeded from ``torch.initial_seed()`` on first use and reseeded whenever that seed
    changes, so each DataLoader worker (seeded by torch per worker and per epoch) draws its own
    reproducible crops, and ``torch.manual_seed`` makes the main process reproducible too.
    """

    def __init__(self, config: ImageConfig) -> None:
        self.config = config
        self._seed: int | None = None
        self._rng: random.Random | None = None

    def __call__(self, image: Image.Image) -> Tensor:
        seed = torch.initial_seed()
        if self._rng is None or seed != self._seed:
            self._seed, self._rng = seed, random.Random(seed)
        return train_transform(image, self.config, self._rng)


def _truncate_words(text: str, max_words: int) -> str:
    return " ".join(text.split(" ")[:max_words])


def clean_caption(text: str, max_words: int = 50) -> str:
    """BLIP's ``pre_caption``: lowercase, ``.!"()*#:;~`` to spaces, whitespace runs to one space,
    strip, keep the first ``max_words`` words."""
    text = _CAPTION_PUNCTUATION.sub(" ", text.lower())
    return _truncate_words(_WHITESPACE.sub(" ", text).strip(), max_words)


def clean_question(text: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question``: lowercase, drop ``.!"()*#:;~``, ``-`` and ``/`` to spaces,
    whitespace runs to one space, strip, keep the first ``max_words`` words."""
    text = _CAPTION_PUNCTUATION.sub("", text.lower()).replace("-", " ").replace("/", " ")
    return _truncate_words(_WHITESPACE.sub(" ", text).strip(), max_words)
