"""BLIP-2's image preprocessing and text cleaning with Pillow and NumPy (no torchvision)."""

from __future__ import annotations

import math
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from qformer.config import ImageConfig
from qformer.data.image_files import MAX_IMAGE_PIXELS

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_TRIES = 10
_CAPTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")
LARGE_IMAGE_PIXELS = 40_000_000  # larger images decode at a reduced scale where the format can (JPEG)
DRAFT_SIDE = 2048  # ... that keeps both sides at least this long: far more than training's 224-364
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16- and 32-bit grey, scaled to 8 bits
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = 255  # transparent pixels are composited on white
EXIF_ORIENTATION = 0x0112


def load_image(
    image: str | Path | BinaryIO | Image.Image, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> Image.Image:
    """An RGB image from a path, an open binary file or a PIL image, upright as its EXIF
    orientation says, 16- and 32-bit values scaled to 8 bits, transparency composited on
    white. A file whose image (after a JPEG's reduced-scale decoding, for images over
    :data:`LARGE_IMAGE_PIXELS`) has more than ``max_pixels`` pixels (None: no limit but Pillow's
    own) is refused before it is decoded. A file that cannot be read fails naming it (ValueError)."""
    if isinstance(image, Image.Image):
        return _rgb(image)
    name = f"image {image}" if isinstance(image, (str, Path)) else "image"
    try:
        with warnings.catch_warnings():  # the size is checked here, against max_pixels, not PIL's limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(image)
        with opened:
            if opened.width * opened.height > LARGE_IMAGE_PIXELS:
                opened.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            pixels = opened.width * opened.height
            if max_pixels is not None and pixels > max_pixels:
                raise ValueError(f"{opened.width}x{opened.height} = {pixels:,} pixels is over the limit of "
                                 f"{max_pixels:,} (max_image_pixels): not decoded")
            return _rgb(opened)
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"cannot read {name}: not an image file that Pillow can identify") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read {name}: {err}") from err


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation), in 8-bit RGB, transparent pixels on white."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:
        image = _to_8_bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (BACKGROUND,) * 4), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grey image as 8-bit "L", its value range scaled, not clipped: 16-bit
    modes and "I" images within 0-65535 by 255/65535, "F" images within 0-1 by 255, any other
    "I" or "F" image from its minimum to its maximum."""
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and 0 <= low and high <= 65535):
        scaled = values * (255 / 65535)
    elif image.mode == "F" and 0 <= low and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # (H, W) uint8: "L"


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
