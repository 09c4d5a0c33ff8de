"""The built-in scenes data set: captions, the held-out split, drawing, the dataset and the file writers."""

from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qformer.data.scenes import (
    COLOURS,
    COUNTS,
    POSITIONS,
    SHAPES,
    SceneDataset,
    SceneSpec,
    all_scenes,
    canonical_caption,
    captions,
    render,
    save_contact_sheet,
    scene_id,
    split_scenes,
    write_scene_folder,
)


def colour_mask(image: Image.Image, colour: str, tolerance: int = 40) -> np.ndarray:
    """(H, W) bool: pixels within ``tolerance`` of the colour's RGB in every channel."""
    pixels = np.asarray(image, dtype=np.int16)
    return (np.abs(pixels - np.asarray(COLOURS[colour], dtype=np.int16)) <= tolerance).all(axis=-1)


def components(mask: np.ndarray) -> int:
    """The number of 4-connected regions of True pixels."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def test_all_scenes_are_the_216_distinct_combinations() -> None:
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 6 * 3 * 3 * 4
    assert [scene_id(scene) for scene in scenes] == list(range(216))
    with pytest.raises(ValueError):
        SceneSpec("pink", "circle", 1, "left")


def test_captions_use_count_words_and_correct_plurals() -> None:
    assert canonical_caption(SceneSpec("red", "circle", 1, "left")) == "one red circle on the left"
    assert canonical_caption(SceneSpec("blue", "square", 2, "top")) == "two blue squares at the top"
    assert canonical_caption(SceneSpec("yellow", "triangle", 3, "right")) == "three yellow triangles on the right"
    for scene in all_scenes():
        texts = captions(scene)
        assert texts[0] == canonical_caption(scene) and len(set(texts)) == len(texts) >= 3
        for text in texts:
            words = text.split()
            assert words.count(scene.colour) == 1 and "  " not in text and text == text.strip()
            if scene.count == 1:
                assert "one" in words and scene.shape in words and scene.shape + "s" not in words
                assert "are" not in words
            else:
                assert {2: "two", 3: "three"}[scene.count] in words and scene.shape + "s" in words
                assert scene.shape not in words and "is" not in words
            assert scene.position in words


def test_held_out_split_is_disjoint_deterministic_and_covers_every_value_in_train() -> None:
    train, held_out = split_scenes(seed=0)
    assert (train, held_out) == split_scenes(seed=0)
    assert split_scenes(seed=1)[1] != held_out
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 216
    assert len(held_out) == round(0.15 * 216)
    assert {scene.colour for scene in train} == set(COLOURS)
    assert {scene.shape for scene in train} == set(SHAPES)
    assert {scene.count for scene in train} == set(COUNTS)
    assert {scene.position for scene in train} == set(POSITIONS)
    # A large fraction must still leave every value in training: the split skips combinations to keep them.
    train, held_out = split_scenes(seed=3, held_out_fraction=0.99)
    assert len(held_out) < 216 and {scene.colour for scene in train} == set(COLOURS)
    assert {scene.position for scene in train} == set(POSITIONS)


def test_render_is_deterministic_given_the_rng_and_honours_the_size() -> None:
    scene = SceneSpec("green", "triangle", 2, "bottom")
    first = render(scene, random.Random(7))
    assert first.size == (64, 64) and first.mode == "RGB"
    assert first.tobytes() == render(scene, random.Random(7)).tobytes()
    assert first.tobytes() != render(scene, random.Random(8)).tobytes()
    assert render(scene, random.Random(7), size=224).size == (224, 224)


@pytest.mark.parametrize("size", [64, 224])
def test_every_scene_draws_its_colour_its_count_of_objects_in_its_half(size: int) -> None:
    scenes = all_scenes() if size == 64 else all_scenes()[::7]
    for index, scene in enumerate(scenes):
        image = render(scene, random.Random(index), size)
        mask = colour_mask(image, scene.colour)
        assert mask.any(), scene
        assert components(mask) == scene.count, scene  # separate objects, none touching
        for other in COLOURS:
            if other != scene.colour:
                assert not colour_mask(image, other).any(), (scene, other)
        ys, xs = np.nonzero(mask)
        half = size / 2
        inside = {"left": xs < half, "right": xs >= half, "top": ys < half, "bottom": ys >= half}[scene.position]
        assert inside.all(), scene  # every object pixel, so the centroid too, lies in the named half
        centroid = xs.mean() if scene.position in ("left", "right") else ys.mean()
        assert (centroid < half) == (scene.position in ("left", "top")), scene


def test_three_objects_cover_more_pixels_than_one() -> None:
    for colour in COLOURS:
        areas = {}
        for count in (1, 3):
            scene = SceneSpec(colour, "square", count, "top")
            areas[count] = np.mean([colour_mask(render(scene, random.Random(s)), colour).sum() for s in range(5)])
        assert areas[3] > 2 * areas[1] > 0


def test_dataset_items_depend_only_on_seed_and_index() -> None:
    scenes = all_scenes()[:10]
    dataset = SceneDataset(scenes, samples_per_scene=3, seed=5)
    assert len(dataset) == 30
    random.seed(123)
    torch.manual_seed(123)
    first = dataset[4]
    random.seed(456)
    torch.manual_seed(456)
    again = SceneDataset(scenes, samples_per_scene=3, seed=5)[4]
    assert first["image"].tobytes() == again["image"].tobytes() and first["text"] == again["text"]
    assert first["image"].tobytes() != dataset[5]["image"].tobytes()
    assert first["image"].tobytes() != SceneDataset(scenes, 3, seed=6)[4]["image"].tobytes()
    scene = scenes[4 // 3]
    assert first["scene_id"] == scene_id(scene) and first["image_id"] == 4
    assert first["canonical"] == canonical_caption(scene) and first["text"] in captions(scene)
    assert len({dataset[i]["text"] for i in range(30)}) > 10  # paraphrases vary
    with pytest.raises(IndexError):
        dataset[30]


def test_dataset_applies_the_transform() -> None:
    dataset = SceneDataset(all_scenes()[:2], 1, seed=0, size=32, transform=lambda image: np.asarray(image))
    assert dataset[1]["image"].shape == (32, 32, 3)


def test_scene_folder_round_trips_the_dataset(tmp_path: Path) -> None:
    scenes = split_scenes(seed=0)[1][:4]
    jsonl = write_scene_folder(tmp_path / "scenes", scenes, samples_per_scene=2, seed=1)
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and [row["image_id"] for row in rows] == list(range(8))
    dataset = SceneDataset(scenes, 2, seed=1)
    for row in rows:
        assert set(row) == {"image", "caption", "image_id"} and not Path(row["image"]).is_absolute()
        path = jsonl.parent / row["image"]
        assert path.is_file()
        item = dataset[row["image_id"]]
        with Image.open(path) as image:
            assert image.convert("RGB").tobytes() == item["image"].tobytes()
        assert row["caption"] == item["text"]


def test_contact_sheet_is_a_grid_of_the_images(tmp_path: Path) -> None:
    dataset = SceneDataset(all_scenes()[:6], 1, seed=0)
    items = [dataset[i] for i in range(6)]
    path = save_contact_sheet([it["image"] for it in items], [it["text"] for it in items], tmp_path / "s.png", 4)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.width == 4 * (128 + 8)
        assert 2 * (64 + 12) < sheet.height < 2 * (64 + 12 + 4 * 20)  # two rows, a short caption band
        pasted = sheet.convert("RGB").crop((4, 4, 68, 68))
        assert pasted.tobytes() == items[0]["image"].tobytes()
        band = np.asarray(sheet.convert("L").crop((4, 72, 132, sheet.height // 2)))
        assert (band < 128).any()  # the caption is drawn under the image
    with pytest.raises(ValueError):
        save_contact_sheet([items[0]["image"]], [], tmp_path / "bad.png")


def test_photographs_are_real_deterministic_crops():
    from qformer.data.photos import PHOTOS, PhotoDataset
    from qformer.data.scenes import all_scenes
    from qformer.train.config import DataSpec
    from qformer.train.data import scene_sets

    first = len(all_scenes())
    data = PhotoDataset(3, seed=5, size=48, first_id=first)
    assert len(data) == 3 * len(PHOTOS) and all(photo.licence for photo in PHOTOS)
    a, b = data[4], PhotoDataset(3, seed=5, size=48, first_id=first)[4]
    assert a["image"].tobytes() == b["image"].tobytes() and a["text"] == b["text"]
    assert a["image"].size == (48, 48) and a["image"].mode == "RGB"
    assert data[3]["image"].tobytes() != data[4]["image"].tobytes()  # two crops of one photograph
    assert a["scene_id"] == first + 1 and a["text"] in a["references"] == list(PHOTOS[1].captions)
    train, evaluation = scene_sets(DataSpec(source="scenes", image_size=64, scenes_per_combination=1, photographs=2), 0)
    assert len(train) == 184 + 2 * len(PHOTOS) and len(evaluation["photographs"]) == len(PHOTOS)
    assert train[184]["canonical"] == PHOTOS[0].captions[0]
    with pytest.raises(IndexError):
        data[len(data)]
