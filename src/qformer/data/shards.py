"""Image-text pairs streamed from tar shards in the webdataset layout (as img2dataset writes
them: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``, with ``NNNNN_stats.json`` and ``NNNNN.parquet``
beside ``NNNNN.tar``), at local paths or URLs.

The webdataset library names and opens the shards: brace-expanded lists
(``shards/{00000..12345}.tar``, several joined by ``::``), ``pipe:`` commands, and its URL schemes
(``http(s)://`` through curl, ``gs://`` through gsutil, ...); a URL whose scheme fsspec serves
with its libraries installed (``s3://`` with s3fs, ``gs://`` with gcsfs, ``memory://``, ...) is
opened through fsspec. Python's ``tarfile`` streams the members (as webdataset's own tar
iterator does) so that a shard cut short can say, from the member offsets, how far it got.
Dealing shards to ranks and workers, and the sample shuffle buffer, are this module's: their
state must be reproducible from a checkpoint, which webdataset's stages do not offer.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from qformer.data.datasets import IMAGE_KEYS, ImageTransform, Sample, Skipped, SkippingDataset
from qformer.data.image_files import MAX_IMAGE_PIXELS
from qformer.data.transforms import DecodeReduction, clean_caption, load_image

_TAIL = 64 * 1024  # bytes at a shard's end searched for the end-of-archive zeros
Raw = dict[str, bytes]  # a sample's members by extension, undecoded


def is_url(shard: str | Path) -> bool:
    """A ``pipe:`` command or ``scheme://`` URL rather than a local path."""
    text = str(shard)
    return text.startswith("pipe:") or "://" in text


def expand_shards(pattern: str | Sequence[str | Path]) -> list[str]:
    """Shard names from a pattern: ``::``-joined parts, each brace-expanded by webdataset
    (``data/{00000..00099}.tar``); a local part with ``*``, ``?`` or ``[`` is a glob. A list is
    taken as it is. None found, or a name given twice, is an error."""
    from webdataset.shardlists import expand_urls

    if not isinstance(pattern, str):
        names = [str(shard) for shard in pattern]
    else:
        names = []
        for part in expand_urls(pattern):
            if not is_url(part) and any(c in part for c in "*?["):
                matched = sorted(glob.glob(part))
                if not matched:
                    raise ValueError(f"no tar shard matches {part!r}")
                names += matched
            else:
                names.append(part)
    if not names:
        raise ValueError(f"no tar shard in {pattern!r}")
    for name in names:
        if not is_url(name) and Path(name).is_dir():
            raise ValueError(f"{name} is a folder: name its shards, e.g. '{Path(name) / '*.tar'}' or a brace pattern")
        if not is_url(name) and not Path(name).is_file():
            raise ValueError(f"{name}: no such tar shard")
    bases = [shard_name(name) for name in names]
    twice = sorted({b for b in bases if bases.count(b) > 1})
    if twice:
        raise ValueError(f"shard file names must be unique (they key the samples and the resume): {twice[:3]} "
                         "appear more than once")
    return names


def shard_name(shard: str | Path) -> str:
    """The shard's file name (``00012.tar``), which keys its samples; of a ``pipe:`` command,
    that of its last word naming a tar (else its last word)."""
    text = str(shard)
    if text.startswith("pipe:"):
        words = text.removeprefix("pipe:").split()
        text = next((w for w in reversed(words) if ".tar" in w), words[-1] if words else text)
    return Path(text.split("?", 1)[0]).name


def open_shard(shard: str | Path) -> IO[bytes]:
    """A shard (or a file beside it) for reading: a local file; a URL fsspec serves (its
    filesystem importable); otherwise webdataset's ``gopen`` (``pipe:``, ``http(s)`` by curl, ...)."""
    text = str(shard)
    if not is_url(text) or text.startswith("file://"):
        return open(text.removeprefix("file://"), "rb")
    scheme = text.partition("://")[0]
    if not text.startswith("pipe:"):
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError):
            pass  # not fsspec's, or its library is not installed: webdataset's handlers
        else:
            return fsspec.open(text, "rb").open()
    from webdataset.gopen import gopen, gopen_schemes

    if not text.startswith("pipe:") and scheme not in gopen_schemes:
        raise ValueError(f"{text}: no reader for {scheme}:// (install fsspec's library for it, e.g. s3fs for "
                         "s3://, gcsfs for gs://), or stream it with pipe:COMMAND")
    return gopen(text, "rb")


def _beside(shard: str | Path, suffix: str) -> str:
    """A file beside the shard, img2dataset's way: ``NNNNN{suffix}`` for ``NNNNN.tar``."""
    text = str(shard)
    folder, _, name = text.rpartition("/")
    stem = name.split("?", 1)[0].partition(".")[0]
    return f"{folder}/{stem}{suffix}" if folder else f"{stem}{suffix}"


def _read_beside(shard: str | Path, suffix: str) -> bytes | None:
    if str(shard).startswith("pipe:"):
        return None
    try:
        with open_shard(_beside(shard, suffix)) as file:
            return file.read()
    except Exception:  # absent or unreadable: the count is estimated instead  # noqa: BLE001
        return None


def _expected_samples(shard: str | Path) -> int | None:
    """The sample count (``successes``) of the shard's stats file, if it is there and readable."""
    try:
        stats = json.loads(_read_beside(shard, "_stats.json") or b"")
    except ValueError:
        return None
    successes = stats.get("successes") if isinstance(stats, dict) else None
    return successes if isinstance(successes, int) and not isinstance(successes, bool) else None


def failed_downloads(shard: str | Path) -> set[str]:
    """The keys img2dataset's parquet manifest (``NNNNN.parquet``) lists with a status other
    than "success" (failed downloads: never samples); empty without a manifest or pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return set()
    data = _read_beside(shard, ".parquet")
    if data is None:
        return set()
    table = pq.read_table(io.BytesIO(data), columns=["key", "status"]).to_pydict()
    return {str(key) for key, status in zip(table["key"], table["status"]) if status != "success"}


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000001.seg.jpg`` -> (``dir/000001``, ``seg.jpg``): the key ends at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


@dataclass
class _ShardProgress:
    """How far the reading of one shard got: the samples read whole, and the stream offset
    where they end (where the unread rest begins)."""

    samples: int = 0
    end: int = 0

    def read(self, end: int) -> None:
        self.samples, self.end = self.samples + 1, end


def _tar_groups(stream: IO[bytes], progress: _ShardProgress) -> Iterator[tuple[str, Raw]]:
    """The files of a tar stream grouped by key: consecutive members sharing a key;
    ``progress`` follows the groups read."""
    key, group = "", {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            file = tar.extractfile(member) if member.isfile() else None
            if file is None:
                continue
            member_key, extension = _split_name(member.name)
            if member_key != key and group:
                progress.read(member.offset)  # the group ends where this member's header starts
                yield key, group
                group = {}
            key = member_key
            group[extension] = file.read()
        end = tar.offset  # where the archive ended
    if group:
        progress.read(end)
        yield key, group


def _unread_bytes(shard: str | Path, end: int) -> int | None:
    """The bytes of an uncompressed local tar (a "ustar" header first) past stream offset
    ``end``, less the trailing zeros (the end-of-archive blocks and padding); None for a
    compressed shard, whose file bytes do not measure the stream, a URL or a missing file."""
    if is_url(shard):
        return None
    try:
        with open(shard, "rb") as file:
            plain = file.read(tarfile.BLOCKSIZE)[257:262] == b"ustar"
            size = file.seek(0, io.SEEK_END)
            file.seek(max(0, size - _TAIL))
            tail = file.read()
    except OSError:
        return None
    return size - (len(tail) - len(tail.rstrip(b"\0"))) - end if plain else None


class _SampleSizes:
    """Bytes per sample over the shards read so far, to estimate what a cut shard lost."""

    def __init__(self) -> None:
        self.samples, self.bytes = 0, 0

    def lost(self, shard: str | Path, progress: _ShardProgress, error: Exception | None) -> tuple[int, str]:
        """How many samples ``shard`` lost (0 when it was read whole) and why: exactly from its
        stats file, else estimated from the bytes left unread (at least the sample being read
        when the stream ends inside it). Then counts its samples read."""
        if progress.samples:
            self.samples, self.bytes = self.samples + progress.samples, self.bytes + progress.end
        expected = _expected_samples(shard)
        unread = _unread_bytes(shard, progress.end)  # past the last whole sample
        cut = error is not None or (unread or 0) > 0
        if error is not None and not progress.samples:
            why = f"could not be read ({error})"
        else:
            why = f"cut short after {progress.samples} sample(s) ({error or 'the archive ends early'})"
        if expected is not None and (cut or progress.samples < expected):
            lost = max(1, expected - progress.samples)
            return lost, f"{why}: {lost} of its {expected} samples lost (as its stats file says)"
        if not cut:
            return 0, ""
        per_sample = self.bytes / self.samples if self.samples else 0
        lost = round(unread / per_sample) if per_sample and unread else 0
        if lost < 1:
            return 1, f"{why}: at least 1 sample lost ({shard_name(_beside(shard, '_stats.json'))} beside it would give the count)"
        return lost, f"{why}: about {lost} sample(s) lost ({unread:,} unread bytes at {per_sample:,.0f} a sample)"


def _stable_id(image_id: Any) -> int:
    """An int id: ints as they are, anything else hashed to 63 bits (the same in every process)."""
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return image_id
    digest = hashlib.blake2b(str(image_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class ShuffleBuffer:
    """A seeded sample shuffle buffer of ``size`` items: filled first, then each new item
    takes the place of one drawn at random, which goes out; the rest drain in random order at
    the end. ``size`` 0 or 1 passes items through in order."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng

    def __call__(self, items: Iterable[Any]) -> Iterator[Any]:
        buffer: list[Any] = []
        for item in items:
            if self.size <= 1:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.size:
                yield self._draw(buffer)
        while buffer:
            yield self._draw(buffer)

    def _draw(self, buffer: list[Any]) -> Any:
        index = self.rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        return buffer.pop()


@dataclass(frozen=True)
class ShardEnd:
    """Marks that every sample of shard ``name`` (``places`` of them, a lost rest counting one)
    has entered the shuffle buffer; yielded by :meth:`TarShardDataset.keyed` in place of a sample."""

    name: str
    places: int


class TarShardDataset(SkippingDataset, IterableDataset):
    """Image-caption pairs streamed from tar shards (see the module), as ``CaptionDataset``'s
    samples.

    - Shards are dealt to distributed ranks, then DataLoader workers: worker ``w`` of rank ``r``
      reads every ``world_size * num_workers``-th shard from ``r * num_workers + w``, in a seeded
      order per ``epoch`` with ``shuffle_seed`` (set the epoch before iterating). ``resampled``
      instead draws shards with replacement, endlessly, seeded by epoch, rank and worker.
    - ``shuffle_buffer`` samples are shuffled (undecoded) across the shards a reader has open.
    - The caption is ``caption_key``'s member (``txt``), or ``json:FIELD`` of the ``.json``; a
      list of captions (CapFilt's) gives one per epoch, drawn with the epoch and key as seed.
      ``image_id`` is the json's int id, or a stable hash of its string id or of the key.
    - Samples that img2dataset's parquet manifest lists as failed downloads are left out.
    - An unreadable sample, or an unreadable rest of a shard (``Skipped`` counting the samples
      lost: exactly from img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar``, else estimated
      from the bytes left unread; at least one for a URL or a compressed shard), yields ``Skipped``.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        transform: ImageTransform | None = None,
        caption_key: str = "txt",
        image_keys: Sequence[str] = IMAGE_KEYS,
        rank: int = 0,
        world_size: int = 1,
        strict: bool = False,
        max_words: int = 50,
        shuffle_seed: int | None = None,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        shuffle_buffer: int = 0,
        resampled: bool = False,
    ) -> None:
        super().__init__(strict, max_image_pixels)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not caption_key or caption_key == "json:":
            raise ValueError(f"caption_key {caption_key!r}: a member's extension (txt) or json:FIELD")
        self.shards = list(shards)
        self.transform = transform
        self.caption_key = caption_key
        self.image_keys = tuple(image_keys)
        self.rank = rank
        self.world_size = world_size
        self.max_words = max_words
        self.shuffle_seed = shuffle_seed
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch = 0

    def epoch_order(self) -> list[str | Path]:
        """This epoch's order of all the shards (seeded with ``shuffle_seed``)."""
        shards = list(self.shards)
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards

    def reader_index(self, worker: int | None, num_workers: int) -> tuple[int, int]:
        """(this reader's index over every rank, the readers): worker ``worker`` of ``num_workers``
        of this rank, by default the current DataLoader worker."""
        if worker is None:
            info = get_worker_info()
            worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def local_shards(self, worker: int | None = None, num_workers: int = 1,
                     done: frozenset[str] = frozenset()) -> Iterable[str | Path]:
        """The shards that reader ``worker`` of ``num_workers`` of this rank reads (by default
        the current DataLoader worker) in this epoch: its share of the epoch's order, less the
        shards named in ``done``; resampled, an endless seeded draw from all of them."""
        reader, readers = self.reader_index(worker, num_workers)
        if self.resampled:
            return self._draws(reader)
        remaining = [shard for shard in self.epoch_order() if shard_name(shard) not in done]
        return remaining[reader::readers]

    def _draws(self, reader: int) -> Iterator[str | Path]:
        rng = random.Random(f"{self.shuffle_seed}:{self.epoch}:{reader}:draws")
        while True:
            yield self.shards[rng.randrange(len(self.shards))]

    def keyed(
        self, shards: Iterable[str | Path], skip: int = 0, reductions: Callable[[str], DecodeReduction] | None = None,
        reader: int = 0, exclude: frozenset[str] = frozenset(),
    ) -> Iterator[tuple[str, Sample | Skipped | ShardEnd]]:
        """``("shard name:sample key", sample)`` for the samples of ``shards``, through the
        shuffle buffer (seeded by the epoch and ``reader``), then decoded; the unreadable rest
        of a shard takes one place, as one ``Skipped`` counting the samples it lost. The first
        ``skip`` places are passed over undecoded, and so are the places in ``exclude``.
        ``reductions`` gives each sample's decode reduction from its place. A :class:`ShardEnd`
        follows the last place of each shard into the buffer."""
        rng = random.Random(f"{self.shuffle_seed}:{self.epoch}:{reader}:buffer")
        for place, raw in ShuffleBuffer(self.shuffle_buffer, rng)(self._raw(shards, exclude)):
            if isinstance(raw, ShardEnd):
                yield place, raw
                continue
            if skip:
                skip -= 1
                continue
            if isinstance(raw, Skipped):
                yield place, self._skip(raw.name, raw.reason, raw.count)
                continue
            shard, key, group = raw
            reduction = None if reductions is None or self.transform is not None else reductions(place)
            yield place, self._sample(f"{shard}:{key}", key, group, reduction)

    def _raw(self, shards: Iterable[str | Path], exclude: frozenset[str]) -> Iterator[tuple[str, Any]]:
        """(place, (shard, key, members) or a Skipped for a lost rest), shard by shard, and a
        ShardEnd after each (to the shuffle buffer, one more item)."""
        sizes = _SampleSizes()
        for shard in shards:
            name, places = shard_name(shard), 0
            failed = failed_downloads(shard)
            progress, error = _ShardProgress(), None
            try:
                with open_shard(shard) as stream:
                    for key, group in _tar_groups(stream, progress):
                        if key in failed:
                            continue
                        places += 1
                        place = f"{name}:{key}"
                        if place not in exclude:
                            yield place, (shard, key, group)
            except (tarfile.TarError, OSError) as err:
                error = err
            lost, reason = sizes.lost(shard, progress, error)
            if lost:
                places += 1
                place = f"{name}:"
                if place not in exclude:
                    yield place, Skipped(str(shard), reason, lost)
            yield name, ShardEnd(name, places)

    def __iter__(self) -> Iterator[Sample | Skipped]:
        reader, _ = self.reader_index(None, 1)
        for _, sample in self.keyed(self.local_shards(), reader=reader):
            if not isinstance(sample, ShardEnd):
                yield sample

    def _caption(self, key: str, group: Raw, meta: Any) -> str:
        """The caption member, or ``json:FIELD``; of a list, this epoch's draw."""
        if not self.caption_key.startswith("json:"):
            return group[self.caption_key].decode("utf-8")
        field = self.caption_key.removeprefix("json:")
        value = meta.get(field) if isinstance(meta, dict) else None
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return random.Random(f"{self.shuffle_seed}:{self.epoch}:{key}:caption").choice(value)
        if not isinstance(value, str):
            raise ValueError(f"its json has no caption string or list of strings at {field!r}")
        return value

    def _sample(self, name: str, key: str, group: Raw, reduction: DecodeReduction | None = None) -> Sample | Skipped:
        image_key = next((k for k in self.image_keys if k in group), None)
        needs = "json" if self.caption_key.startswith("json:") else self.caption_key
        if image_key is None or needs not in group:
            return self._skip(name, f"needs one of {self.image_keys} and {needs!r}, has {sorted(group)}")
        try:
            meta = json.loads(group["json"]) if "json" in group else {}
            caption = self._caption(key, group, meta)
            if not caption.strip():
                raise ValueError("caption of whitespace only")
            image = load_image(io.BytesIO(group[image_key]), self.max_image_pixels, reduction)
        except ValueError as err:  # also UnicodeDecodeError and JSONDecodeError
            return self._skip(name, err)
        image_id = meta.get("image_id", key) if isinstance(meta, dict) else key
        text = clean_caption(caption, self.max_words)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": text, "image_id": _stable_id(image_id)}


def _encode(extension: str, value: Any) -> bytes:
    """A member's bytes: bytes as they are, str as UTF-8, a PIL image in the extension's format,
    anything else as JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format=Image.registered_extensions()[f".{extension}"])
        return buffer.getvalue()
    return json.dumps(value).encode("utf-8")


def write_tar_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> Path:
    """Write samples like ``{"__key__": "000001", "jpg": PIL image or bytes, "txt": str,
    "json": dict}`` to a tar shard, one member per ``key.extension``."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            if "__key__" not in sample:
                raise ValueError(f"sample without '__key__': has {sorted(sample)}")
            for extension, value in sample.items():
                if extension == "__key__":
                    continue
                data = _encode(extension, value)
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
