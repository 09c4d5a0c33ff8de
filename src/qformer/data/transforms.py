"""BLIP-2's image preprocessing and text cleaning with Pillow and NumPy (no torchvision). Decoding
and evaluation's normalisation are in :mod:`qformer.data.pixels` (no torch); this module makes
the tensors."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from qformer.config import ImageConfig
from qformer.data.pixels import DRAFTED, DecodeReduction, load_image, normalised_pixels

__all__ = ["DRAFTED", "DecodeReduction", "load_image"]  # decoding, imported from here by the data modules

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_TRIES = 10
_CAPTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def crop_reduction(width: int, height: int, config: ImageConfig, rng: random.Random) -> int:
    """How much a ``width x height`` image can shrink before :func:`train_transform` crops it
    with ``rng`` (a copy: ``rng`` is not advanced): the crop's shorter side over ``config.size``,
    rounded down. Decoded at 1/scale with scale at most that, the crop keeps at least
    ``config.size`` pixels each way, so its resize to ``config.size`` still only shrinks: the
    decoding gives the crop all the pixels its output needs."""
    replay = random.Random()
    replay.setstate(rng.getstate())
    left, top, right, bottom = random_resized_crop_box(width, height, replay)
    return min(right - left, bottom - top) // config.size


def _normalise(image: Image.Image, config: ImageConfig,
               box: tuple[float, float, float, float] | None = None) -> Tensor:
    """:func:`~qformer.data.pixels.normalised_pixels` as a tensor: (3, S, S)."""
    return torch.from_numpy(normalised_pixels(image, config, box))


def eval_image(image: str | Path | Image.Image, config: ImageConfig) -> Tensor:
    """One image preprocessed for evaluation: (3, S, S)."""
    return _normalise(load_image(image), config)


def eval_resized(image: Image.Image, config: ImageConfig) -> Image.Image:
    """An image :func:`load_image` gave, resized as evaluation resizes it: bicubic to
    ``config.size`` square. :func:`eval_image` of the result gives the same pixels as of ``image``
    itself (Pillow copies an image already at the size asked), so a server can keep this, S*S*3
    bytes, instead of the upload, up to 4 bytes a pixel of 40 Mpx, while a request waits."""
    return image.resize((config.size, config.size), Image.Resampling.BICUBIC)


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
    Deterministic given ``rng``.

    The crop box is drawn on the image's full size; an image decoded at reduced scale
    (``info[DRAFTED]``, :func:`load_image` with a ``reduction``) is cropped at the same fraction of
    the image, the box scaled to its pixels (sub-pixel edges kept by the resize's ``box``), so
    the augmentation draws the same crops whatever the decoding scale."""
    image = load_image(image)
    width, height, scale = image.info.get(DRAFTED, (image.width, image.height, 1))
    box = [edge / scale for edge in random_resized_crop_box(width, height, rng)]
    whole = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))  # within the image
    cropped = image.crop(whole)
    left, top, right, bottom = box[0] - whole[0], box[1] - whole[1], box[2] - whole[0], box[3] - whole[1]
    if rng.random() < 0.5:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left, right = cropped.width - right, cropped.width - left
    return _normalise(cropped, config, (left, top, right, bottom))


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
