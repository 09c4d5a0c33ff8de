"""Real photographs for the demo, with no download: the public-domain and CC0 pictures that
scikit-image ships inside its wheel (``skimage.data``), each with a few hand-written captions.

An item is a random square crop of one photograph (its side half to all of the photograph's
shorter side, seeded by the item's index), so training and held-out items show the same photographs framed differently. Items have
the keys of :class:`~qformer.data.scenes.SceneDataset`; ``scene_id`` continues after the 216
scenes, so that a photograph is one "image" for ITC whichever crop shows it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Photo:
    name: str  # the skimage.data function that returns it
    licence: str
    captions: tuple[str, ...]  # the canonical caption first
    keywords: tuple[str, ...]  # what the photograph shows, in a word or two each


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "public domain (NASA)",
          ("an astronaut in an orange suit", "a photo of an astronaut"), ("astronaut", "orange", "suit")),
    Photo("camera", "CC0 (Lav Varshney)",
          ("a man with a camera on a tripod", "a black and white photo of a photographer"), ("man", "camera")),
    Photo("chelsea", "CC0 (Stefan van der Walt)",
          ("a tabby cat looking at the camera", "a photo of a cat"), ("tabby", "cat")),
    Photo("coffee", "CC0 (Rachel Michetti)",
          ("a cup of coffee on a saucer", "a photo of a coffee cup"), ("coffee", "cup")),
    Photo("rocket", "public domain (SpaceX)",
          ("a rocket launching into the sky", "a photo of a rocket launch"), ("rocket", "launch")),
    Photo("hubble_deep_field", "public domain (NASA)",
          ("many galaxies in deep space", "a telescope photo of distant galaxies"), ("galaxies", "space")),
    Photo("retina", "CC0 (Wikimedia Commons)",
          ("a photo of the back of a human eye", "a retina with blood vessels"), ("retina", "eye")),
    Photo("brick", "CC0 (CC0Textures)",
          ("a grey brick wall", "a photo of a wall of bricks"), ("brick", "wall")),
    Photo("grass", "CC0 (CC0Textures)",
          ("a close view of grass", "a photo of a lawn"), ("grass", "lawn")),
    Photo("gravel", "CC0 (CC0Textures)",
          ("a close view of gravel", "a photo of small stones"), ("gravel", "stones")),
)


@lru_cache(maxsize=len(PHOTOS))
def load_photo(name: str) -> Image.Image:
    """The RGB photograph ``skimage.data.<name>()``; needs scikit-image (the ``demo`` extra)."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("the demo's photographs come with scikit-image: pip install scikit-image") from err
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def random_crop(image: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """A square crop, its side half to all of the shorter side, resized to ``size`` (bicubic)."""
    side = round(min(image.size) * rng.uniform(0.5, 1.0))
    left = rng.randint(0, image.width - side)
    top = rng.randint(0, image.height - side)
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


class PhotoDataset(Dataset):
    """``crops_per_photo`` random crops of each photograph; item i is fixed by (seed, i) alone."""

    def __init__(
        self, crops_per_photo: int, seed: int = 0, size: int = 64, first_id: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if crops_per_photo < 1:
            raise ValueError(f"crops_per_photo must be at least 1, got {crops_per_photo}")
        self.crops_per_photo, self.seed, self.size, self.first_id = crops_per_photo, seed, size, first_id
        self.transform = transform

    def __len__(self) -> int:
        return len(PHOTOS) * self.crops_per_photo

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        photo = PHOTOS[index // self.crops_per_photo]
        rng = random.Random(self.seed * 1_000_003 + index)
        image = random_crop(load_photo(photo.name), rng, self.size)
        return dict(
            image=image if self.transform is None else self.transform(image),
            text=rng.choice(photo.captions),
            canonical=photo.captions[0],
            references=list(photo.captions),
            scene_id=self.first_id + index // self.crops_per_photo,
            image_id=index,
        )
