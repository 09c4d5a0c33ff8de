"""A built-in, download-free image-text data set: procedurally drawn scenes with compositional captions.

A scene is (colour, shape, count, position), e.g. "two blue squares at the top": ``count`` objects of one
colour and shape, grouped in the named half of a plain light image. There are 6 * 3 * 3 * 4 = 216 scenes;
``split_scenes`` holds out whole combinations whose attribute values all still appear in training, so the
held-out scenes test compositional generalisation. Every image is drawn from its own ``random.Random``,
so items are deterministic across processes and never touch a global RNG.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (130, 40, 170),
    "orange": (245, 125, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 246, 246),
    (250, 246, 236),
    (238, 244, 250),
    (242, 248, 238),
    (248, 240, 244),
)

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_POSITION_REGIONS = {"left": "the left side", "right": "the right side", "top": "the top", "bottom": "the bottom"}

# Layout, as fractions of the image size: the margin kept from the image edges and from the midline, the
# smallest gap between two objects, and the range of an object's side; a side plus the gap always fits one
# of the three slots along the group's long axis, so objects never touch.
_MARGIN = 0.04
_GAP = 0.04
_MIN_SIDE, _MAX_SIDE = 0.19, 0.25


@dataclass(frozen=True)
class SceneSpec:
    """One combination of attributes; the caption is true of every image drawn from it."""

    colour: str
    shape: str
    count: int
    position: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.shape not in SHAPES:
            raise ValueError(f"unknown colour or shape in {self}")
        if self.count not in COUNTS or self.position not in POSITIONS:
            raise ValueError(f"unknown count or position in {self}")


def all_scenes() -> list[SceneSpec]:
    """All 216 combinations, in a fixed order (colour, then shape, count, position)."""
    return [SceneSpec(*values) for values in itertools.product(COLOURS, SHAPES, COUNTS, POSITIONS)]


@lru_cache(maxsize=1)
def _scene_ids() -> dict[SceneSpec, int]:
    return {scene: index for index, scene in enumerate(all_scenes())}


def scene_id(scene: SceneSpec) -> int:
    """The index of ``scene`` in ``all_scenes()``."""
    return _scene_ids()[scene]


def attribute_words(scene: SceneSpec) -> tuple[str, str, str, str]:
    """The scene's words as its captions write them: count, colour, noun, position."""
    noun = scene.shape if scene.count == 1 else scene.shape + "s"
    return COUNT_WORDS[scene.count], scene.colour, noun, scene.position


def captions(scene: SceneSpec) -> list[str]:
    """Every caption of ``scene``: the canonical one first, then its paraphrases."""
    count, _, noun, _ = attribute_words(scene)
    verb = "is" if scene.count == 1 else "are"
    objects = f"{count} {scene.colour} {noun}"
    return [
        f"{objects} {_POSITION_PHRASES[scene.position]}",
        f"there {verb} {objects} {_POSITION_PHRASES[scene.position]}",
        f"{objects} near {_POSITION_REGIONS[scene.position]} of the image",
        f"an image with {objects} {_POSITION_PHRASES[scene.position]}",
    ]


def canonical_caption(scene: SceneSpec) -> str:
    """The reference caption for evaluation, e.g. "two blue squares at the top"."""
    return captions(scene)[0]


def _attribute_values(scene: SceneSpec) -> tuple[tuple[str, Any], ...]:
    return (("colour", scene.colour), ("shape", scene.shape), ("count", scene.count), ("position", scene.position))


def split_scenes(seed: int = 0, held_out_fraction: float = 0.15) -> tuple[list[SceneSpec], list[SceneSpec]]:
    """(train, held_out): a deterministic split of whole combinations, both in ``all_scenes()`` order.

    Combinations are held out in a seeded random order, skipping any whose removal would leave one of its
    attribute values with no training scene; so every colour, shape, count and position is seen in training.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
    scenes = all_scenes()
    target = round(held_out_fraction * len(scenes))
    in_train = Counter(value for scene in scenes for value in _attribute_values(scene))
    held_out: set[SceneSpec] = set()
    for scene in random.Random(seed).sample(scenes, len(scenes)):
        if len(held_out) == target:
            break
        if all(in_train[value] > 1 for value in _attribute_values(scene)):
            held_out.add(scene)
            for value in _attribute_values(scene):
                in_train[value] -= 1
    train = [scene for scene in scenes if scene not in held_out]
    seen = {value for scene in train for value in _attribute_values(scene)}
    assert seen == set(in_train), "every attribute value must appear in training"
    return train, [scene for scene in scenes if scene in held_out]


def _boxes(scene: SceneSpec, rng: random.Random, size: int) -> list[tuple[int, int, int, int]]:
    """One (x0, y0, x1, y1) square box per object, inside the named half of the image.

    The group runs along the half's long axis (a column for left/right, a row for top/bottom), centred on it
    with some jitter, in up to three non-overlapping slots; each object is jittered in size and placement.
    """
    margin, gap = _MARGIN * size, _GAP * size
    long_span = size - 2 * margin
    short_span = size / 2 - 2 * margin
    slot = long_span / max(COUNTS)
    free = long_span - scene.count * slot
    group_start = margin + free / 2 + rng.uniform(-0.25, 0.25) * free
    short_start = margin if scene.position in ("left", "top") else size / 2 + margin
    short_bias = rng.random()
    boxes = []
    for k in range(scene.count):
        side = rng.uniform(_MIN_SIDE, _MAX_SIDE) * size
        along = group_start + k * slot + gap / 2 + rng.uniform(0.0, slot - side - gap)
        across = short_start + (short_span - side) * min(1.0, max(0.0, short_bias + rng.uniform(-0.15, 0.15)))
        x, y = (across, along) if scene.position in ("left", "right") else (along, across)
        boxes.append((round(x), round(y), round(x + side), round(y + side)))
    return boxes


def render(scene: SceneSpec, rng: random.Random, size: int = 64) -> Image.Image:
    """A ``size`` x ``size`` RGB drawing of ``scene``; the same ``rng`` state gives the same pixels."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for x0, y0, x1, y1 in _boxes(scene, rng, size):
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


class SceneDataset(Dataset):
    """``samples_per_scene`` drawings of each scene; item i is fixed by (seed, i) alone.

    An item is dict(image, text, canonical, references, scene_id, image_id): ``image`` is the PIL image (or
    ``transform(image)``), ``text`` a random caption from ``captions(scene)`` for training, ``canonical``
    the reference caption, ``references`` every caption of the scene, ``scene_id`` the scene's index in
    ``all_scenes()`` and ``image_id`` is i.
    """

    def __init__(
        self,
        scenes: Sequence[SceneSpec],
        samples_per_scene: int,
        seed: int = 0,
        size: int = 64,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if not scenes or samples_per_scene < 1:
            raise ValueError("need at least one scene and one sample per scene")
        self.scenes = list(scenes)
        self.samples_per_scene = samples_per_scene
        self.seed = seed
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.scenes) * self.samples_per_scene

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        scene = self.scenes[index // self.samples_per_scene]
        rng = random.Random(self.seed * 1_000_003 + index)
        image = render(scene, rng, self.size)
        return dict(
            image=image if self.transform is None else self.transform(image),
            text=rng.choice(captions(scene)),
            canonical=canonical_caption(scene),
            references=captions(scene),
            scene_id=scene_id(scene),
            image_id=index,
        )


def write_scene_folder(
    directory: str | Path, scenes: Sequence[SceneSpec], samples_per_scene: int, seed: int = 0, size: int = 64
) -> Path:
    """Write the items of ``SceneDataset(scenes, samples_per_scene, seed, size)`` as ``images/*.png`` plus
    ``annotations.jsonl`` (one {"image", "caption", "image_id"} object a line, image paths relative to
    ``directory``); returns the JSONL path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    dataset = SceneDataset(scenes, samples_per_scene, seed, size)
    annotations = directory / "annotations.jsonl"
    with annotations.open("w", encoding="utf-8") as lines:
        for index in range(len(dataset)):
            item = dataset[index]
            relative = f"images/{index:06d}.png"
            item["image"].save(directory / relative)
            lines.write(json.dumps({"image": relative, "caption": item["text"], "image_id": index}) + "\n")
    return annotations


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a too-long word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_contact_sheet(
    images: Sequence[Image.Image], captions: Sequence[str], path: str | Path, columns: int = 4
) -> Path:
    """A white PNG grid, ``columns`` tiles wide, of the images with their (wrapped) captions under them.

    Each tile is ``max(widest image, 128) + 8`` px wide; the caption band is as tall as the most wrapped caption.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need as many captions as images, got {len(captions)} for {len(images)}")
    pad = 4
    font = ImageFont.load_default()
    image_width = max(max(image.width for image in images), 128)
    image_height = max(image.height for image in images)
    wrapped = [_wrap(caption, font, image_width) for caption in captions]
    line_height = font.getbbox("Ag")[3] + 2
    tile_width = image_width + 2 * pad
    tile_height = image_height + 3 * pad + line_height * max(len(lines) for lines in wrapped)
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * tile_width, rows * tile_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, lines) in enumerate(zip(images, wrapped)):
        left = (index % columns) * tile_width + pad
        top = (index // columns) * tile_height + pad
        sheet.paste(image.convert("RGB"), (left, top))
        for number, line in enumerate(lines):
            draw.text((left, top + image_height + pad + number * line_height), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
