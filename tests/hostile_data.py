"""A generated hostile data set: every kind of bad or awkward sample the data readers must
survive, in every supported format (COCO JSON, JSONL and CSV captions, instruction JSONL, VQA
JSON, tar shards), about one sample in ten unreadable.

Unreadable: a missing file, a zero-byte file, a truncated JPEG, text named .jpg, a PNG whose
header declares 12000 x 12000 pixels (a decompression bomb under Pillow's own error limit), a
JPEG that declares 60000 x 60000 (over it); in shards also a shard cut mid-member. Readable but
awkward: a JPEG stored sideways with an EXIF orientation, a 16-bit grey PNG, a transparent PNG.
Captions of whitespace only are left out by the readers.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qformer.data.shards import write_tar_shard

SAMPLES = 60  # per format, of which UNREADABLE are unreadable
WHITESPACE_IN_SHARDS = 20  # the sample whose caption is blank in the shards
ROTATED = {"colour": (0, 0, 255), "elsewhere": (255, 0, 0)}  # upright: blue on top, red below


def image_bytes(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def picture(n: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    return Image.new("RGB", size, ((37 * n) % 256, (91 * n) % 256, 200 - n))


def truncated_jpeg() -> bytes:
    """The first half of a JPEG of noise."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = image_bytes(Image.fromarray(pixels), "JPEG")
    return data[: len(data) // 2]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A few hundred bytes of PNG whose header declares ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def jpeg_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A small JPEG whose frame header declares ``width`` x ``height`` pixels."""
    data = bytearray(image_bytes(picture(0, (16, 16)), "JPEG"))
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def rotated_jpeg() -> bytes:
    """A 40 x 20 JPEG, blue left half, red right half, whose EXIF orientation (6) says to
    turn it a quarter clockwise: upright it is 20 x 40, blue on top."""
    image = Image.new("RGB", (40, 20), ROTATED["elsewhere"])
    image.paste(ROTATED["colour"], (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(image, "JPEG", exif=exif, quality=95)


def grey_16_bit(value: int = 30000) -> bytes:
    """A 16-bit grey PNG, every pixel ``value`` (of 65535)."""
    return image_bytes(Image.fromarray(np.full((24, 24), value, dtype=np.uint16)), "PNG")


def transparent_png(colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    """An RGBA PNG of ``colour`` at alpha 0: nothing shows."""
    return image_bytes(Image.new("RGBA", (24, 24), (*colour, 0)), "PNG")


# name: the image file's bytes (None: the file is missing)
UNREADABLE: dict[str, bytes | None] = {
    "missing.jpg": None,
    "empty.jpg": b"",
    "truncated.jpg": truncated_jpeg(),
    "text.jpg": b"this is not an image\n",
    "bomb.png": png_bomb(),
    "bomb.jpg": jpeg_bomb(),
}
AWKWARD: dict[str, bytes] = {"rotated.jpg": rotated_jpeg(), "grey16.png": grey_16_bit(),
                             "transparent.png": transparent_png()}


@dataclass
class HostileSet:
    root: Path  # images, and every format's files
    files: dict[str, Path] = field(default_factory=dict)  # format -> file (shards: a glob)
    unreadable: list[str] = field(default_factory=list)  # image file names
    unreadable_in_shards: list[str] = field(default_factory=list)  # "shard:key" ends, the cut shard's name
    lost_in_cut_shard: int = 0


def _images() -> list[tuple[str, bytes | None]]:
    """SAMPLES (name, bytes) pairs: the unreadable and awkward ones spread among good PNGs."""
    bad = list(UNREADABLE.items()) + list(AWKWARD.items())
    good = [(f"good{n:03d}.png", image_bytes(picture(n), "PNG")) for n in range(SAMPLES - len(bad))]
    step = SAMPLES // len(bad)
    for i, item in enumerate(bad):
        good.insert(i * step + 3, item)
    return good


def write_hostile_set(root: Path) -> HostileSet:
    """Write the images and every format's files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    images = _images()
    for name, data in images:
        if data is not None:
            (root / name).write_bytes(data)
    captions = [{"image": name, "caption": f"a picture number {i}", "image_id": i} for i, (name, _) in enumerate(images)]
    blank = {"image": images[0][0], "caption": " \t ", "image_id": 0}  # left out by the readers
    rows = captions[:10] + [blank] + captions[10:]
    found = HostileSet(root, unreadable=list(UNREADABLE))
    found.files["jsonl"] = root / "captions.jsonl"
    found.files["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    found.files["coco"] = root / "captions.json"
    found.files["coco"].write_text(json.dumps(rows))
    found.files["csv"] = root / "captions.csv"
    with found.files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption", "image_id"])
        writer.writeheader()
        writer.writerows(rows)
    found.files["instructions"] = root / "instructions.jsonl"
    found.files["instructions"].write_text("".join(
        json.dumps({"image": name, "instruction": "what colour is it?", "answer": "red"}) + "\n" for name, _ in images))
    found.files["vqa"] = root / "vqa.json"
    found.files["vqa"].write_text(json.dumps([
        {"image": name, "question": "what colour is it?", "answer": ["red", "blue", "red"], "question_id": i}
        for i, (name, _) in enumerate(images)]))
    found.files["shards"], found.lost_in_cut_shard = _write_shards(root / "shards", images)
    keys = [i for i, (name, _) in enumerate(images) if name in UNREADABLE] + [WHITESPACE_IN_SHARDS]
    found.unreadable_in_shards = [f".tar:{i:06d}" for i in keys] + ["00005.tar"]
    return found


def _write_shards(folder: Path, images: list[tuple[str, bytes | None]]) -> tuple[str, int]:
    """The samples in 5 shards of 12 (a missing image: a sample with no image member; a
    whitespace caption in place of one good sample), then a sixth shard of 13 cut inside its
    twelfth sample, beside img2dataset's stats file: 11 samples whole and a place counting the
    2 lost, so that each shard fills whole batches of 12. Returns the glob and the count lost."""
    folder.mkdir()
    samples = []
    for i, (name, data) in enumerate(images):
        sample = {"__key__": f"{i:06d}", "txt": f"a picture number {i}", "json": {"image_id": i}}
        if data is not None:
            sample[name.rpartition(".")[2]] = data
        samples.append(sample)
    samples[WHITESPACE_IN_SHARDS]["txt"] = "   "
    for s in range(5):
        write_tar_shard(folder / f"{s:05d}.tar", samples[s * 12 : (s + 1) * 12])
    extra = [{"__key__": f"9{i:05d}", "png": image_bytes(picture(i), "PNG"), "txt": f"a picture number {i}"}
             for i in range(13)]
    whole = write_tar_shard(folder / "00005.tar", extra)
    with tarfile.open(whole) as tar:
        cut_at = tar.getmember("900011.png").offset_data + 40  # inside the twelfth sample's image
    whole.write_bytes(whole.read_bytes()[:cut_at])
    (folder / "00005_stats.json").write_text(json.dumps({"count": 13, "successes": 13, "failed_to_download": 0}))
    return str(folder / "*.tar"), 2
