"""Caption files and their images written as webdataset tar shards, in img2dataset's layout.

A caption file (COCO JSON, JSONL or CSV, read by :func:`~qformer.data.datasets.read_captions`)
gives one sample per image, all its captions kept: ``{key}.jpg`` (a JPEG's bytes as they are;
other formats re-encoded to JPEG, or with ``keep_bytes`` PNG and WebP kept as ``{key}.png`` /
``{key}.webp``), ``{key}.txt`` (the first caption) and ``{key}.json`` (``key``, ``image_id``,
``path``, ``captions``: all of them, CapFilt-style, for a reader to draw one an epoch). Shard
``i`` takes images ``i * N`` to ``(i + 1) * N - 1`` of the file (first-seen order); an image
that cannot be read (missing, truncated, not an image, over the pixel limit: what the training
readers would skip) is left out and counted, so a shard holds at most N samples, as
img2dataset's do. Beside each ``NNNNN.tar``: ``NNNNN_stats.json`` (img2dataset's counts) and,
where pyarrow is installed, ``NNNNN.parquet`` (one row per image: key, status, error_message,
caption, path, image_id). ``manifest.json``, written last, lists the shards and the skipped
images. Every file is written atomically and nothing in them depends on the time, the worker
count or the machine: the same input gives byte-identical output.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from PIL import Image

from qformer.checkpoint import atomic_write, new_file_mode
from qformer.data.datasets import CaptionRecord, read_captions
from qformer.data.image_files import MAX_IMAGE_PIXELS
from qformer.data.shards import write_tar_shard
from qformer.data.transforms import load_image

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_DIGITS = 5  # 00000.tar, as img2dataset names them (wider past 100,000 shards)
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's JPEG with extra pictures appended, read as a JPEG
KEPT_FORMATS = {"PNG": "png", "WEBP": "webp"}  # kept as they are with keep_bytes (the readers take them)
JPEG_QUALITY = 95
SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE = "success", "failed_to_download", "failed_to_resize"
# what a rerun with overwrite removes: the files this module writes, and temporary files left by a crash
_WRITTEN = re.compile(r"^(\d{5,}(\.tar|_stats\.json|\.parquet)|manifest\.json|\.(\d{5,}(\.tar|_stats\.json|\.parquet)"
                      r"|manifest\.json)\..*\.tmp)$")


@dataclass(frozen=True)
class ImageEntry:
    """One image of a caption file and all its captions, in the file's order."""

    path: str  # as the caption file names it, relative to the image root
    captions: tuple[str, ...]
    image_id: str | int  # the file's id for it, or its path when it has none


@dataclass(frozen=True)
class ShardOptions:
    """How every shard is written (the same for all workers)."""

    out: Path
    image_root: Path
    keep_bytes: bool = False
    jpeg_quality: int = JPEG_QUALITY
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    shard_digits: int = SHARD_DIGITS
    key_digits: int = 4
    parquet: bool = False
    mode: int = 0o644  # the files' permissions (a temporary file's 0600 would keep others from reading them)


@dataclass
class ShardResult:
    """What one shard holds: its images, the samples written (and their captions), the
    images skipped as ``{"key", "path", "status", "error_message"}``."""

    name: str
    count: int
    samples: int = 0
    captions: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardsSummary:
    """What :func:`write_shards` wrote: the shards, their totals, and whether parquet was written."""

    out: Path
    shards: list[ShardResult]
    parquet: bool

    @property
    def images(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def captions(self) -> int:
        return sum(shard.captions for shard in self.shards)

    @property
    def skipped(self) -> list[dict[str, str]]:
        return [entry for shard in self.shards for entry in shard.skipped]


class _Unreadable(Exception):
    """An image that cannot go into a shard: img2dataset's status and the reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def group_by_image(records: Sequence[CaptionRecord]) -> list[ImageEntry]:
    """One entry per image path, in first-seen order, with every caption of it in order; the
    id is the first record's (its path when it has none)."""
    captions: dict[str, list[str]] = {}
    ids: dict[str, str | int] = {}
    for record in records:
        captions.setdefault(record.image, []).append(record.caption)
        ids.setdefault(record.image, record.image if record.image_id is None else record.image_id)
    return [ImageEntry(path, tuple(texts), ids[path]) for path, texts in captions.items()]


def image_member(file: Path, options: ShardOptions) -> tuple[str, bytes]:
    """``(extension, bytes)`` of the image ``file`` as a shard stores it, decoded in full first
    (as the training readers decode it) so that an unreadable one fails here (``_Unreadable``:
    ``failed_to_download`` for a file that cannot be read, ``failed_to_resize`` for one that
    does not decode). JPEGs keep their bytes; other images are re-encoded from the RGB image the
    readers would see (upright, transparency on white), or kept as PNG / WebP with ``keep_bytes``."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise _Unreadable(FAILED_TO_DOWNLOAD, err.strerror or type(err).__name__) from None
    try:
        image = load_image(io.BytesIO(data), options.max_image_pixels)
        with Image.open(io.BytesIO(data)) as opened:  # the header only, for the format
            kind = opened.format
    except (ValueError, OSError) as err:
        raise _Unreadable(FAILED_TO_RESIZE, str(err)) from None
    if kind in JPEG_FORMATS:
        return "jpg", data
    if options.keep_bytes and kind in KEPT_FORMATS:
        return KEPT_FORMATS[kind], data
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return "jpg", buffer.getvalue()


def shard_name(index: int, options: ShardOptions) -> str:
    """``00000``: a shard's name without its extension."""
    return f"{index:0{options.shard_digits}d}"


def _write_json(path: Path, value: Any, mode: int) -> None:
    text = json.dumps(value, indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode)


def _write_parquet(path: Path, rows: list[dict[str, str]], mode: int) -> None:
    """img2dataset's per-shard table: one row per image of the shard, read or not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ("key", "status", "error_message", "caption", "path", "image_id")
    schema = pa.schema([(name, pa.string()) for name in columns])
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp), mode)


def write_shard(index: int, images: Sequence[ImageEntry], options: ShardOptions) -> ShardResult:
    """Write shard ``index`` of ``images`` (its share of the file, in order) into
    ``options.out``: the tar (samples streamed into it, one image in memory at a time), the
    parquet table when asked, then the stats file, each atomically."""
    name = shard_name(index, options)
    result = ShardResult(f"{name}.tar", len(images))
    rows: list[dict[str, str]] = []

    def samples() -> Iterator[dict[str, Any]]:
        for offset, entry in enumerate(images):
            key = f"{name}{offset:0{options.key_digits}d}"
            row = {"key": key, "status": SUCCESS, "error_message": None, "caption": entry.captions[0],
                   "path": entry.path, "image_id": str(entry.image_id)}
            rows.append(row)
            try:
                extension, data = image_member(options.image_root / entry.path, options)
            except _Unreadable as err:
                row.update(status=err.status, error_message=err.reason)
                result.skipped.append({"key": key, "path": entry.path, "status": err.status,
                                       "error_message": err.reason})
                continue
            result.samples += 1
            result.captions += len(entry.captions)
            meta = {"key": key, "image_id": entry.image_id, "path": entry.path, "captions": list(entry.captions)}
            yield {"__key__": key, extension: data, "txt": entry.captions[0], "json": meta}

    atomic_write(options.out / result.name, lambda tmp: write_tar_shard(tmp, samples()), options.mode)
    if options.parquet:
        _write_parquet(options.out / f"{name}.parquet", rows, options.mode)
    statuses = Counter(row["status"] if row["error_message"] is None else row["error_message"] for row in rows)
    _write_json(options.out / f"{name}_stats.json", {
        "count": result.count,
        "successes": result.samples,
        "failed_to_download": sum(row["status"] == FAILED_TO_DOWNLOAD for row in rows),
        "failed_to_resize": sum(row["status"] == FAILED_TO_RESIZE for row in rows),
        "status_dict": dict(sorted(statuses.items())),
    }, options.mode)
    return result


def parquet_available() -> bool:
    """Whether pyarrow can be imported (the parquet tables are written only then)."""
    return importlib.util.find_spec("pyarrow") is not None


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """``out``'s entries; one that holds files already is refused unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder for the shards")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise FileExistsError(f"{out} holds files already ({len(entries)}, e.g. {entries[0].name}): "
                              "choose an empty folder or pass --overwrite")
    return entries


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` (see :func:`check_out`); with ``overwrite``, remove what an earlier run
    wrote there (shards, stats, parquet, manifest first; other files stay)."""
    entries = check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()  # first: never a manifest beside shards of another run
    for entry in entries:
        if _WRITTEN.match(entry.name) and entry.is_file():
            entry.unlink()


def _check_options(samples_per_shard: int, workers: int, jpeg_quality: int, max_image_pixels: int | None) -> None:
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be within 1-100, got {jpeg_quality}")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be at least 1 (or none), got {max_image_pixels}")


def _check_root(images: Sequence[ImageEntry], root: Path, first: int = 100) -> None:
    """Fail at once when none of the first images is a file under ``root`` (a wrong
    ``--image-root`` would otherwise give shards of nothing, every image skipped)."""
    looked = images[:first]
    if not any((root / entry.path).is_file() for entry in looked):
        raise FileNotFoundError(f"none of the first {len(looked)} image(s) is under --image-root {root} "
                                f"(e.g. {root / looked[0].path}): is it the folder the file's paths start from?")


def write_shards(
    source: str | Path,
    out: str | Path,
    samples_per_shard: int,
    image_root: str | Path | None = None,
    workers: int = 1,
    keep_bytes: bool = False,
    jpeg_quality: int = JPEG_QUALITY,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    overwrite: bool = False,
) -> ShardsSummary:
    """Write the images of caption file ``source`` (under ``image_root``, by default the file's
    folder) as tar shards of ``samples_per_shard`` images each into ``out``, ``workers``
    processes writing one shard each at a time, then ``manifest.json``. See the module's text
    for the layout; the output does not depend on ``workers``."""
    _check_options(samples_per_shard, workers, jpeg_quality, max_image_pixels)
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a file (a caption file: .json, .jsonl or .csv)")
    root = source.parent if image_root is None else Path(image_root)
    if not root.is_dir():
        raise NotADirectoryError(f"--image-root {root} is not a folder")
    check_out(out, overwrite)  # before the file is read: a refusal comes at once
    images = group_by_image(read_captions(source))
    if not images:
        raise ValueError(f"{source}: no captions in it")
    _check_root(images, root)
    prepare_out(out, overwrite)  # nothing is made or removed before every check has passed
    chunks = [images[start:start + samples_per_shard] for start in range(0, len(images), samples_per_shard)]
    options = ShardOptions(out, root, keep_bytes, jpeg_quality, max_image_pixels,
                           max(SHARD_DIGITS, len(str(len(chunks) - 1))), len(str(samples_per_shard - 1)),
                           parquet_available(), new_file_mode())
    results = _run(chunks, options, min(workers, len(chunks)))
    summary = ShardsSummary(out, results, options.parquet)
    for entry in summary.skipped[:5]:
        logger.warning("skipped %s (%s): %s", root / entry["path"], entry["status"], entry["error_message"])
    _write_json(out / MANIFEST_NAME, manifest(summary, source, root, samples_per_shard), options.mode)
    return summary


def _in_order(pool: ProcessPoolExecutor, chunks: list[list[ImageEntry]], options: ShardOptions,
              window: int) -> Iterator[ShardResult]:
    """The shards' results in shard order, at most ``window`` shards handed to the pool at a
    time (``pool.map`` would pickle every shard's share of the file at once)."""
    pending: deque[Future[ShardResult]] = deque()
    for index, chunk in enumerate(chunks):
        pending.append(pool.submit(write_shard, index, chunk, options))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _run(chunks: list[list[ImageEntry]], options: ShardOptions, workers: int) -> list[ShardResult]:
    """Every shard written, in shard order, by ``workers`` processes (in this one for one)."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(chunks), unit="shard", disable=None) as progress, \
            (ProcessPoolExecutor(max_workers=workers) if workers > 1 else nullcontext()) as pool:
        done = (map(write_shard, range(len(chunks)), chunks, repeat(options)) if pool is None
                else _in_order(pool, chunks, options, 2 * workers))
        for result in done:
            results.append(result)
            progress.update()
    return results


def manifest(summary: ShardsSummary, source: Path, image_root: Path, samples_per_shard: int) -> dict[str, Any]:
    """``manifest.json``: where the data came from, the totals, each shard's counts, the images skipped."""
    return {
        "source": str(source),
        "image_root": str(image_root),
        "samples_per_shard": samples_per_shard,
        "images": summary.images,
        "samples": summary.samples,
        "captions": summary.captions,
        "skipped": len(summary.skipped),
        "parquet": summary.parquet,
        "shards": [{"name": s.name, "count": s.count, "samples": s.samples, "captions": s.captions}
                   for s in summary.shards],
        "skipped_images": summary.skipped,
    }


def describe(summary: ShardsSummary) -> str:
    """The command's one-line summary."""
    skipped = summary.skipped
    reasons = Counter(entry["status"] for entry in skipped)
    line = (f"wrote {len(summary.shards)} shard(s) to {summary.out}: {summary.samples} sample(s) with "
            f"{summary.captions} caption(s) of {summary.images} image(s), {len(skipped)} skipped")
    if skipped:
        line += " (" + ", ".join(f"{count} {status}" for status, count in sorted(reasons.items())) + ")"
    line += f"; {MANIFEST_NAME} lists them"
    if not summary.parquet:
        line += "; parquet tables skipped: pyarrow is not installed (pip install 'qformer[shards]')"
    return line

