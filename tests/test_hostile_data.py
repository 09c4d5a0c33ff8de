"""Hostile images and data sets: EXIF orientation, 16-bit and transparent images, decompression
bombs refused before decoding, shards cut mid-member counted by the samples they lost, batches
with no readable sample passed over, a mostly unreadable run stopped, and training to the end
on the generated hostile data set (tests/hostile_data.py) in every format."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from hostile_data import (
    ROTATED,
    UNREADABLE,
    grey_16_bit,
    image_bytes,
    jpeg_bomb,
    picture,
    png_bomb,
    rotated_jpeg,
    transparent_png,
    write_hostile_set,
)
from qformer.data import pixels as decoding
from qformer.data.datasets import CaptionDataset, CaptionRecord, Skipped
from qformer.data.shards import ShardEnd, TarShardDataset, write_tar_shard
from qformer.data.transforms import load_image
from qformer.train.loop import train
from test_train import tiny


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_exif_orientation_is_applied() -> None:
    image = load_image(io.BytesIO(rotated_jpeg()))
    assert image.size == (20, 40)  # stored 40 x 20, upright 20 x 40
    assert np.abs(pixels(image)[5, 10] - ROTATED["colour"]).max() < 40  # blue on top
    assert np.abs(pixels(image)[35, 10] - ROTATED["elsewhere"]).max() < 40
    assert load_image(image).size == (20, 40)  # already upright: left as it is


@pytest.mark.parametrize("image, expected", [
    (Image.open(io.BytesIO(grey_16_bit(30000))), 117),  # 30000 / 65535 of white, not clipped to 255
    (Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)), 128),  # "I" within 16 bits
    (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), 128),  # "F" within 0-1
], ids=["I;16", "I", "F"])
def test_wide_grey_values_are_scaled_not_clipped(image: Image.Image, expected: int) -> None:
    assert (pixels(load_image(image)) == expected).all()


def test_a_wide_image_beyond_16_bits_is_stretched_from_its_range() -> None:
    values = np.array([[-10.0, 30.0]], dtype=np.float32)
    assert pixels(load_image(Image.fromarray(values)))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_transparent_pixels_show_white() -> None:
    assert (pixels(load_image(io.BytesIO(transparent_png()))) == 255).all()  # not the colour under them
    half = load_image(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert (pixels(half) == 127).all()
    grey = load_image(Image.new("LA", (2, 2), (0, 0)))
    assert (pixels(grey) == 255).all()
    palette = Image.new("P", (2, 2), 3)
    palette.putpalette([0, 0, 0] * 256)  # black under the transparent index
    assert (pixels(load_image(io.BytesIO(image_bytes(palette, "PNG", transparency=3)))) == 255).all()


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_ordinary_images_decode_as_pillow_does(format: str) -> None:
    """Parity with LAVIS's ``Image.open(path).convert("RGB")`` for ordinary images."""
    data = image_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8)), format)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(pixels(load_image(io.BytesIO(data))), pixels(expected))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding an image file fails the test: a bomb must be refused from its header."""

    def refuse(self):
        raise AssertionError(f"{self.size} image decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("data, limit, reason", [
    (png_bomb(12000, 12000), None, "12000x12000 = 144,000,000 pixels is over the limit of 64,000,000"),
    (png_bomb(20000, 20000), None, "Image size .* exceeds limit"),  # beyond Pillow's own error threshold
    (jpeg_bomb(60000, 60000), None, "Image size .* exceeds limit"),
    (jpeg_bomb(9000, 9000), 1_000_000, "2250x2250 = 5,062,500 pixels is over the limit of 1,000,000"),  # at 1/4
], ids=["png-under-pillow-limit", "png-over-pillow-limit", "jpeg-over-pillow-limit", "jpeg-reduced-still-over"])
def test_decompression_bombs_are_refused_undecoded(no_decoding, data: bytes, limit: int | None, reason: str) -> None:
    """Refused from the header, as a ValueError (Pillow's warning between its two thresholds
    is not raised either: the pixel limit decides there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=f"cannot read image: {reason}"):
            load_image(io.BytesIO(data), **({} if limit is None else {"max_pixels": limit}))


def test_the_pixel_limit_is_configurable(tmp_path: Path) -> None:
    data = image_bytes(picture(1, (100, 100)), "PNG")
    with pytest.raises(ValueError, match=r"100x100 = 10,000 pixels is over the limit of 5,000"):
        load_image(io.BytesIO(data), max_pixels=5000)
    assert load_image(io.BytesIO(data), max_pixels=None).size == (100, 100)
    config = tiny(tmp_path, "--data.source", "captions", "--data.path", "x.jsonl", "--data.max_image_pixels", "77")
    assert config.data.max_image_pixels == 77


def test_a_bomb_in_a_dataset_is_skipped_with_its_reason_and_strict_names_it(tmp_path: Path, no_decoding) -> None:
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    records = [CaptionRecord("bomb.png", "a bomb")]
    skipped = CaptionDataset(records, tmp_path).read(0)
    assert isinstance(skipped, Skipped) and "over the limit of 64,000,000" in skipped.reason
    with pytest.raises(ValueError, match=r"cannot read sample 0 \(.*bomb\.png\): .*144,000,000 pixels"):
        CaptionDataset(records, tmp_path, strict=True).read(0)
    picture(0, (50, 50)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"50x50 = 2,500 pixels is over the limit of 1,000"):
        CaptionDataset([CaptionRecord("small.png", "a")], tmp_path, strict=True, max_image_pixels=1000).read(0)


def test_a_large_jpeg_decodes_at_a_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over LARGE_IMAGE_PIXELS, a JPEG decodes at the smallest of 1/2, 1/4, 1/8 scale that
    keeps both sides at least DRAFT_SIDE long, and the pixel limit applies to that."""
    monkeypatch.setattr(decoding, "LARGE_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(decoding, "DRAFT_SIDE", 16)
    data = image_bytes(picture(2, (128, 64)), "JPEG")
    assert load_image(io.BytesIO(data), max_pixels=2000).size == (32, 16)  # 1/4: 8192 pixels read as 512
    assert load_image(io.BytesIO(image_bytes(picture(2, (128, 64)), "PNG")), max_pixels=None).size == (128, 64)


def shard(path: Path, count: int, key: str = "") -> Path:
    return write_tar_shard(path, [{"__key__": f"{key}{i:04d}", "png": picture(i, (32, 32)), "txt": f"picture {i}"}
                                  for i in range(count)])


def cut(path: Path, member: str, into: int = 40) -> None:
    """Cut the shard ``into`` bytes into ``member``'s data."""
    with tarfile.open(path) as tar:
        at = tar.getmember(member).offset_data + into
    path.write_bytes(path.read_bytes()[:at])


def places(dataset: TarShardDataset, skip: int = 0) -> list:
    return [sample for _, sample in dataset.keyed(dataset.shards, skip) if not isinstance(sample, ShardEnd)]


def test_a_shard_cut_mid_member_counts_the_samples_it_lost(tmp_path: Path) -> None:
    first = shard(tmp_path / "00000.tar", 30, "a")  # whole: the bytes per sample
    counted = shard(tmp_path / "00001.tar", 30, "b")
    cut(counted, "b0009.png")
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 30}))
    estimated = shard(tmp_path / "00002.tar", 30, "c")
    cut(estimated, "c0009.png")
    dataset = TarShardDataset([first, counted, estimated])
    read = places(dataset)
    lost = [s for s in read if isinstance(s, Skipped)]
    assert [s.name for s in lost] == [str(counted), str(estimated)]
    assert lost[0].count == 21 and "21 of its 30 samples lost" in lost[0].reason  # exact, from the stats file
    assert lost[1].count == 1 and "at least 1 sample lost (00002_stats.json beside it" in lost[1].reason
    assert len(read) == 30 + 10 + 10 and dataset.skipped == 21 + 1
    assert places(TarShardDataset([first, counted, estimated]), skip=38)[:3] == read[38:41]  # one place each


def test_a_shard_with_a_corrupt_header_counts_the_samples_it_lost(tmp_path: Path) -> None:
    whole = shard(tmp_path / "whole.tar", 20, "a")
    broken = shard(tmp_path / "broken.tar", 20, "b")
    with tarfile.open(broken) as tar:
        at = tar.getmember("b0012.png").offset
    data = bytearray(broken.read_bytes())
    data[at : at + 512] = b"\x07" * 512  # tarfile takes an invalid header for the archive's end
    broken.write_bytes(bytes(data))
    read = places(TarShardDataset([whole, broken]))
    assert len(read) == 20 + 12 + 1 and isinstance(read[-1], Skipped)
    assert read[-1].count == 8 and "the archive ends early): about 8 sample(s) lost" in read[-1].reason
    with pytest.raises(ValueError, match=r"cannot read sample .*broken\.tar: cut short after 12 sample"):
        places(TarShardDataset([whole, broken], strict=True))


def test_a_compressed_shard_counts_at_least_the_sample_cut(tmp_path: Path) -> None:
    """A .tar.gz's file bytes do not measure its tar stream: read whole it lost nothing, cut
    it lost at least the sample being read."""
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        for i in range(6):
            for extension, data in (("png", image_bytes(picture(i, (32, 32)), "PNG")), ("txt", b"a picture")):
                info = tarfile.TarInfo(f"{i:04d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert len(places(TarShardDataset([whole]))) == 6
    cut_file = tmp_path / "cut.tar.gz"
    cut_file.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    read = places(TarShardDataset([whole, cut_file]))
    assert isinstance(read[-1], Skipped) and read[-1].count == 1 and "at least 1 sample lost" in read[-1].reason


def caption_files(root: Path, names: list[str]) -> str:
    """A JSONL caption file for ``names``; a name without a file stays missing."""
    root.mkdir(exist_ok=True)
    rows = [json.dumps({"image": name, "caption": f"a picture number {i}", "image_id": i}) for i, name in enumerate(names)]
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return str(root / "captions.jsonl")


def losses_logged(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_batch_with_no_readable_sample_is_passed_over(tmp_path: Path, caplog) -> None:
    """The first batch (in the sampler's order) is all missing: every rank moves on to the next
    one, its skipped samples counted and named with that one's."""
    from qformer.train.sampler import GlobalBatchSampler

    data = tmp_path / "data"
    first = next(iter(GlobalBatchSampler(12, 4, seed=3)))  # tiny.yaml's seed and batch size
    names = [f"{i}.png" for i in range(12)]
    path = caption_files(data, names)
    for i, name in enumerate(names):
        if (0, i) not in first:
            picture(i).save(data / name)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qformer.train.loop"):
        result = train(tiny(run, "--data.source", "captions", "--data.path", path, "--data.image_root", str(data),
                            "--steps", "2"))
    assert result["step"] == 2 and [r["skipped"] for r in losses_logged(run)] == [4, 4]
    assert [r["epoch"] for r in losses_logged(run)] == [0, 0]  # batches 1 and 2 of epoch 0 trained
    for _, index in first:
        assert f"({data / f'{index}.png'}): cannot read image" in caplog.text


def test_a_shard_batch_with_no_readable_sample_is_passed_over(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        shard(folder / f"{s:05d}.tar", 4, f"{s}")
    broken = write_tar_shard(folder / "00003.tar", [{"__key__": f"x{i}", "png": b"", "txt": "x"} for i in range(4)])
    run = tmp_path / "run"
    result = train(tiny(run, "--data.source", "shards", "--data.path", str(folder / "*.tar"), "--steps", "4",
                       "--data.shuffle_buffer", "0"))  # in shard order: the broken shard is one batch
    assert result["step"] == 4 and broken.is_file()
    lines = losses_logged(run)
    assert [r["epoch"] for r in lines] == [0, 0, 0, 1] and lines[2]["skipped"] == 4  # 4 batches, one passed over


def test_a_mostly_unreadable_run_stops_with_the_ratio(tmp_path: Path) -> None:
    """Batches 0, 5, 10, 15 and 20 (in the sampler's order) readable, the rest missing: after
    100 samples, 80 unreadable."""
    from qformer.train.sampler import GlobalBatchSampler

    data = tmp_path / "data"
    names = [f"{i}.png" for i in range(120)]
    path = caption_files(data, names)
    for number, batch in enumerate(GlobalBatchSampler(120, 4, seed=3)):
        for _, index in batch if number % 5 == 0 else []:
            picture(index).save(data / names[index])
    args = ["--data.source", "captions", "--data.path", path, "--data.image_root", str(data), "--steps", "100"]
    with pytest.raises(ValueError, match=r"^80 of the 100 samples read so far were unreadable \(80%, over "
                                         r"data.max_unreadable 0.5\); first: \d+ \(.*\.png\): cannot read image"):
        train(tiny(tmp_path / "run", *args))
    from qformer.train.config import resume_changes

    higher = tiny(tmp_path / "run", *args, "--data.max_unreadable", "0.9")
    assert resume_changes(tiny(tmp_path / "run", *args), higher) == {"data.max_unreadable": (0.5, 0.9)}  # may resume
    nothing = caption_files(tmp_path / "nothing", ["gone.png"] * 8)
    with pytest.raises(ValueError, match=r"no batch of a whole epoch held a readable sample \(8 of 8 samples"):
        train(tiny(tmp_path / "never", "--data.source", "captions", "--data.path", nothing,
                   "--data.image_root", str(tmp_path / "nothing"), "--data.max_unreadable", "1"))


@pytest.mark.parametrize("format", ["coco", "jsonl", "csv", "shards", "instructions", "vqa"])
def test_training_on_the_hostile_data_set_runs_to_the_end(tmp_path: Path, caplog, format: str) -> None:
    """One epoch (3 batches) over the hostile set in each format: the unreadable samples
    (shards: also a whitespace caption and the 2 samples lost with a cut shard) skipped, counted
    and the first named in the log; the awkward ones trained on."""
    hostile = write_hostile_set(tmp_path / "data")
    source = {"coco": "captions", "jsonl": "captions", "csv": "captions"}.get(format, format)
    batch = 24 if format == "shards" else 20  # one epoch in 3 steps
    args = ["--data.source", source, "--data.path", str(hostile.files[format]), "--data.image_root", str(hostile.root),
            "--data.batch_size", str(batch), "--steps", "3", "--save_every", "100"]
    if source in ("instructions", "vqa"):
        from stage2_helpers import save_tiny_blip2

        save_tiny_blip2(tmp_path / "blip2", "opt")
        args += ["--model.stage", "stage2", "--model.blip2", str(tmp_path / "blip2"), "--data.image_size", "28"]
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qformer.train.loop"):
        result = train(tiny(run, *args))
    assert torch.isfinite(torch.tensor(result["loss"]))
    lines = losses_logged(run)
    assert [r["epoch"] for r in lines] == [0] * len(lines)  # one epoch: every sample once
    expected = len(UNREADABLE) + (1 + hostile.lost_in_cut_shard if format == "shards" else 0)
    assert lines[-1]["skipped"] == expected
    named = [line for line in caplog.text.splitlines() if "skipped sample " in line]
    bad = hostile.unreadable_in_shards if format == "shards" else [f"/{name}): " for name in hostile.unreadable]
    assert len(named) == 5 and all(any(b in line for b in bad) for line in named), named


@pytest.mark.slow
def test_two_ranks_pass_over_a_batch_that_one_of_them_cannot_read(tmp_path: Path) -> None:
    """Rank 0's share of the first global batch is all missing, rank 1's readable: both pass
    over it (the same passes on every rank) and train on the next three."""
    from qformer.train.sampler import GlobalBatchSampler
    from test_train import free_port, torchrun

    data = tmp_path / "data"
    names = [f"{i}.png" for i in range(16)]
    path = caption_files(data, names)
    first = next(iter(GlobalBatchSampler(16, 2, rank=0, world_size=2, seed=3)))
    for i, name in enumerate(names):
        if (0, i) not in first:
            picture(i).save(data / name)
    run = tmp_path / "run"
    process = torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                       overrides=["--data.source", "captions", "--data.path", path, "--data.image_root", str(data),
                                  "--data.batch_size", "2", "--steps", "3", "--output_dir", str(run)])
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    lines = losses_logged(run)
    assert [(r["step"], r["epoch"]) for r in lines] == [(1, 0), (2, 0), (3, 0)]  # batches 1-3 of 4
    assert lines[0]["skipped"] == 2  # rank 0's count
