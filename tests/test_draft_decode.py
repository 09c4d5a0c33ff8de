"""Training JPEGs decode in draft mode at the smallest scale their random crop allows; every
other image, and evaluation, decodes at full size."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hostile_data import image_bytes
from qformer.config import ImageConfig
from qformer.data.datasets import CaptionDataset, CaptionRecord
from qformer.data.shards import TarShardDataset, write_tar_shard
from qformer.data.transforms import (
    DRAFTED,
    crop_reduction,
    eval_image,
    load_image,
    random_resized_crop_box,
    train_transform,
)
from qformer.train.data import TrainImages, TrainShards, draft_reduction

CONFIG = ImageConfig(size=32)


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """Smooth colour fields with a little noise: a JPEG-friendly stand-in for a photograph."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(field, np.float32) + rng.normal(0, 2, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(width: int = 640, height: int = 480, seed: int = 0, **options) -> bytes:
    return image_bytes(photo(width, height, seed), "JPEG", quality=95, **options)


def test_a_jpeg_decodes_at_the_largest_power_of_2_within_the_reduction() -> None:
    data = jpeg(640, 480)
    for wanted, scale in ((1, 1), (2, 2), (3, 2), (7, 4), (8, 8), (20, 8)):
        seen = []
        image = load_image(io.BytesIO(data), reduction=lambda w, h: seen.append((w, h)) or wanted)
        assert seen == [(640, 480)] and image.size == (640 // scale, 480 // scale)
        assert image.info.get(DRAFTED, (640, 480, 1)) == (640, 480, scale)


def test_the_crop_keeps_at_least_the_output_size_at_the_decoded_scale() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        width, height = rng.randint(100, 3000), rng.randint(100, 3000)
        reduction = crop_reduction(width, height, CONFIG, rng)
        scale = next(s for s in (8, 4, 2, 1) if s <= max(reduction, 1))
        left, top, right, bottom = random_resized_crop_box(width, height, rng)  # rng was not advanced
        assert min(right - left, bottom - top) / scale >= CONFIG.size
        assert scale == 8 or min(right - left, bottom - top) / (2 * scale) < CONFIG.size  # the smallest scale


def test_a_drafted_crop_is_the_same_fraction_of_the_image() -> None:
    """The same crops as at full size: the tensors differ only by the decoding scale; a box
    drawn on the decoded size instead would differ far more."""
    data = jpeg(1200, 900)
    full = load_image(io.BytesIO(data))
    near, wrong = [], []
    for seed in range(12):
        drafted = load_image(io.BytesIO(data), reduction=draft_reduction(CONFIG, random.Random(seed), True, True))
        assert drafted.info[DRAFTED][2] >= 4  # the crop is at least 450 px: 1/4 or 1/8 leaves it 32 px or more
        reference = train_transform(full, CONFIG, random.Random(seed))
        near.append((train_transform(drafted, CONFIG, random.Random(seed)) - reference).abs().mean())
        drafted.info.pop(DRAFTED)
        wrong.append((train_transform(drafted, CONFIG, random.Random(seed)) - reference).abs().mean())
    assert max(near) < 0.02 and min(wrong) > 2 * max(near)


def test_an_upright_turned_jpeg_crops_on_its_upright_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # turn a quarter clockwise: 640 x 480 as stored, 480 x 640 upright
    data = jpeg(640, 480, exif=exif)
    seen = []
    image = load_image(io.BytesIO(data), reduction=lambda w, h: seen.append((w, h)) or 2)
    assert seen == [(480, 640)] and image.size == (240, 320) and image.info[DRAFTED] == (480, 640, 2)


def test_evaluation_and_the_default_decode_at_full_size_as_pillow_does(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg(1200, 900))
    expected = Image.open(tmp_path / "a.jpg").convert("RGB")
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.jpg")), np.asarray(expected))
    sample = CaptionDataset([CaptionRecord("a.jpg", "a")], tmp_path).read(0)
    assert np.array_equal(np.asarray(sample["image"]), np.asarray(expected))
    assert torch.equal(eval_image(tmp_path / "a.jpg", CONFIG), eval_image(expected, CONFIG))


def test_a_png_never_drafts() -> None:
    data = image_bytes(photo(640, 480), "PNG")
    image = load_image(io.BytesIO(data), reduction=lambda w, h: 8)
    assert DRAFTED not in image.info
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_draft_off_or_a_crop_too_small_gives_the_full_decode_pixels(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(jpeg(1200, 900))
    (tmp_path / "small.jpg").write_bytes(jpeg(60, 50, seed=1))  # no crop of it reaches 64 px: 1/1
    records = [CaptionRecord("big.jpg", "a", 0), CaptionRecord("small.jpg", "b", 1)]
    data = CaptionDataset(records, tmp_path)
    off, on = TrainImages(data, CONFIG, seed=5, draft=False), TrainImages(data, CONFIG, seed=5)
    for index, name in enumerate(("big.jpg", "small.jpg")):
        rng = random.Random((5 * 1_000_003 + 0) * 10_000_019 + index)  # TrainImages's seeding
        expected = train_transform(Image.open(tmp_path / name).convert("RGB"), CONFIG, rng)
        assert torch.equal(off[(0, index)]["image"], expected)
    assert torch.equal(on[(0, 1)]["image"], off[(0, 1)]["image"])
    assert not torch.equal(on[(0, 0)]["image"], off[(0, 0)]["image"])
    assert (on[(0, 0)]["image"] - off[(0, 0)]["image"]).abs().mean() < 0.02


def test_shard_samples_draft_like_file_samples(tmp_path: Path) -> None:
    shard = write_tar_shard(tmp_path / "s.tar", [{"__key__": "k", "jpg": jpeg(1200, 900), "txt": "a"}])
    reader = TarShardDataset([shard])
    on, off = (next(TrainShards(reader, CONFIG, seed=1, draft=draft).samples(0, 1))[1]["image"] for draft in (True, False))
    assert not torch.equal(on, off) and (on - off).abs().mean() < 0.02


def test_a_dataset_with_its_own_transform_decodes_at_full_size(tmp_path: Path) -> None:
    """Its transform's crop is not the one a reduction was planned for."""
    (tmp_path / "a.jpg").write_bytes(jpeg(640, 480))
    data = CaptionDataset([CaptionRecord("a.jpg", "a")], tmp_path, transform=lambda image: image)
    assert data.read(0, lambda width, height: 8)["image"].size == (640, 480)
    shard = write_tar_shard(tmp_path / "s.tar", [{"__key__": "k", "jpg": jpeg(640, 480), "txt": "a"}])
    reader = TarShardDataset([shard], transform=lambda image: image)
    assert next(reader.keyed([shard], reductions=lambda key: lambda width, height: 8))[1]["image"].size == (640, 480)
