"""Training data for BLIP-2: captions (COCO JSON, JSONL, CSV), VQA and instructions, as map-style
data sets (tar shards stream: :mod:`qformer.data.shards`).

Images are decoded when a sample is read, so in DataLoader worker processes, then passed to
the dataset's ``transform`` (None keeps the RGB PIL image, to augment later). A sample that
cannot be read (missing file, corrupt or truncated image, not an image) is skipped: map-style
datasets return None (their ``read`` returns the ``Skipped`` sentinel instead, naming the sample
and why) and the shard dataset yields a ``Skipped``, which the collate counts (a worker's own
``skipped`` counter never reaches the main process). With ``strict=True`` such a sample raises a
ValueError naming it instead.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

from qformer.data.image_files import MAX_IMAGE_PIXELS
from qformer.data.transforms import DecodeReduction, clean_caption, clean_question, load_image

ImageTransform = Callable[[Image.Image], Tensor]  # an RGB image -> (3, S, S); None keeps the image
Sample = dict[str, Any]
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class CaptionRecord:
    image: str  # path relative to the dataset's image_root
    caption: str
    image_id: str | int | None = None


@dataclass
class VQARecord:
    image: str  # path relative to the dataset's image_root
    question: str
    answers: list[str]
    question_id: str | int | None = None


@dataclass(frozen=True)
class InstructionRecord:
    image: str  # path relative to the dataset's image_root
    instruction: str
    answer: str


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample that could not be read (or, with ``count`` > 1, for the samples
    lost with the unreadable rest of a tar shard), so that the collate can count them and the
    trainer can say which they were and why."""

    name: str
    reason: str = ""
    count: int = 1


def skipped_count(samples: Sequence[Any]) -> int:
    """The samples that a batch's ``samples`` lost: one a None, ``count`` a ``Skipped``."""
    return sum(1 if sample is None else sample.count for sample in samples
               if sample is None or isinstance(sample, Skipped))


def _require(entry: Any, keys: Sequence[str], where: str) -> None:
    """Fail naming ``where`` unless ``entry`` is a mapping with a non-empty value for each key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [key for key in keys if entry.get(key) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _strings(value: Any, key: str, where: str) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of strings")
    return values


def _caption_records(entry: Any, where: str, blank: list[str]) -> list[CaptionRecord]:
    """One record per caption of an ``{"image", "caption", "image_id"?}`` entry; a caption of
    whitespace only is left out and its place noted in ``blank``."""
    _require(entry, ("image", "caption"), where)
    image_id = entry.get("image_id")
    if image_id == "":  # an empty CSV cell
        image_id = None
    captions = _strings(entry["caption"], "caption", where)
    blank.extend(where for c in captions if not c.strip())
    return [CaptionRecord(str(entry["image"]), c, image_id) for c in captions if c.strip()]


def _report_blank(path: Path, blank: list[str]) -> None:
    if blank:
        logger.warning("%s: %d caption(s) of whitespace only skipped (first at %s)", path, len(blank),
                       blank[0].removeprefix(f"{path}: "))


def _read_text(path: Path) -> str:
    """A text file as UTF-8; other bytes are named by line and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                         f"{err.start}); save the file as UTF-8") from None


def read_json(path: Path) -> Any:
    """A JSON file (UTF-8); invalid JSON named with the file."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` for each non-empty line of a JSONL file, ``where`` naming file and line."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON: {err}") from None


def read_coco_captions(path: str | Path) -> list[CaptionRecord]:
    """Captions from COCO's official ``{"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}`` or LAVIS/BLIP's ``[{"image", "caption", "image_id"?}]``
    (a list caption gives one record per caption)."""
    path = Path(path)
    data = read_json(path)
    blank: list[str] = []
    if isinstance(data, list):
        records = [r for i, entry in enumerate(data) for r in _caption_records(entry, f"{path}: entry {i}", blank)]
        _report_blank(path, blank)
        return records
    if not (isinstance(data, dict) and "images" in data and "annotations" in data):
        raise ValueError(f"{path}: expected COCO's {{'images', 'annotations'}} or a list of {{'image', 'caption'}}")
    files = {}
    for i, image in enumerate(data["images"]):
        _require(image, ("id", "file_name"), f"{path}: images[{i}]")
        files[image["id"]] = image["file_name"]
    records = []
    for i, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _require(annotation, ("image_id", "caption"), where)
        image_id = annotation["image_id"]
        if image_id not in files:
            raise ValueError(f"{where}: image_id {image_id!r} is not in 'images'")
        records.extend(_caption_records({**annotation, "image": files[image_id]}, where, blank))
    _report_blank(path, blank)
    return records


def read_jsonl_captions(path: str | Path) -> list[CaptionRecord]:
    """Captions from one ``{"image", "caption", "image_id"?}`` JSON object per line."""
    path = Path(path)
    blank: list[str] = []
    records = [record for where, entry in _json_lines(path) for record in _caption_records(entry, where, blank)]
    _report_blank(path, blank)
    return records


def read_csv_captions(path: str | Path) -> list[CaptionRecord]:
    """Captions from a CSV file with a header naming columns ``image``, ``caption`` and
    optionally ``image_id`` (an empty cell means none)."""
    path = Path(path)
    records: list[CaptionRecord] = []
    blank: list[str] = []
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = sorted({"image", "caption"} - set(reader.fieldnames or ()))
    if missing:
        raise ValueError(f"{path}: the header lacks column(s) {missing}")
    for row in reader:
        records.extend(_caption_records(row, f"{path}: line {reader.line_num}", blank))
    _report_blank(path, blank)
    return records


def read_captions(path: str | Path) -> list[CaptionRecord]:
    """Captions from a .json (COCO), .jsonl or .csv file."""
    readers = {".json": read_coco_captions, ".jsonl": read_jsonl_captions, ".csv": read_csv_captions}
    suffix = Path(path).suffix.lower()
    if suffix not in readers:
        raise ValueError(f"{path}: unknown caption file type {suffix!r}; expected one of {sorted(readers)}")
    return readers[suffix](path)


def read_vqa(path: str | Path) -> list[VQARecord]:
    """Questions from LAVIS's ``[{"image", "question", "answer": str or list, "question_id"?}]``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{'image', 'question', 'answer'}}")
    records = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        _require(entry, ("image", "question", "answer"), where)
        answers = _strings(entry["answer"], "answer", where)
        records.append(VQARecord(str(entry["image"]), entry["question"], answers, entry.get("question_id")))
    return records


def read_instructions(path: str | Path) -> list[InstructionRecord]:
    """Instruction data: JSONL (one ``{"image", "instruction", "answer"}`` a line) or a JSON list
    of the same objects."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        entries = list(_json_lines(path))
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of {{'image', 'instruction', 'answer'}}")
        entries = [(f"{path}: entry {i}", entry) for i, entry in enumerate(data)]
    records = []
    for where, entry in entries:
        _require(entry, ("image", "instruction", "answer"), where)
        records.append(InstructionRecord(str(entry["image"]), str(entry["instruction"]), str(entry["answer"])))
    return records


class SkippingDataset:
    """Skip-or-raise policy shared by the datasets; ``skipped`` counts in this process only.
    Reading takes an optional ``reduction`` (``load_image``'s: how much the caller's crop lets
    an image shrink as it decodes; the trainer's, per sample); without one, or for a dataset
    with a ``transform`` of its own (whose crop it does not know), images decode at full size."""

    def __init__(self, strict: bool, max_image_pixels: int | None) -> None:
        self.strict, self.max_image_pixels = strict, max_image_pixels
        self.skipped = 0

    def _skip(self, name: str, reason: object, count: int = 1) -> Skipped:
        if self.strict:
            raise ValueError(f"cannot read sample {name}: {reason}")
        self.skipped += count
        return Skipped(name, str(reason), count)


class _ImageFolderDataset(SkippingDataset, Dataset):
    """Map-style records whose images lie under ``image_root``."""

    def __init__(
        self,
        records: Sequence[Any],
        image_root: str | Path,
        transform: ImageTransform | None = None,
        strict: bool = False,
        max_words: int = 50,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__(strict, max_image_pixels)
        self.records = list(records)
        self.image_root = Path(image_root)
        self.transform = transform
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        sample = self.read(index)
        return None if isinstance(sample, Skipped) else sample

    def read(self, index: int, reduction: DecodeReduction | None = None) -> Sample | Skipped:
        """Sample ``index``, or ``Skipped`` (counted) naming it and why when it cannot be read."""
        raise NotImplementedError

    def _image(self, path: str, index: int, reduction: DecodeReduction | None) -> Tensor | Image.Image | Skipped:
        """The transformed image of sample ``index``, or ``Skipped`` (counted) when it cannot be read."""
        file = self.image_root / path
        try:
            image = load_image(file, self.max_image_pixels, reduction if self.transform is None else None)
        except ValueError as err:
            return self._skip(f"{index} ({file})", err)
        return image if self.transform is None else self.transform(image)


def _image_key(record: CaptionRecord) -> str:
    """The record's image id, or its path when it has none, so that captions of one image match."""
    return str(record.image if record.image_id is None else record.image_id)


class CaptionDataset(_ImageFolderDataset):
    """Image-caption pairs: ``{"image": (3, S, S) (or the PIL image without a transform), "text":
    cleaned caption, "image_id": int}``, or None for an unreadable image. ``image_index`` maps
    each image's id (or, without one, its path) to that int (built on first use)."""

    records: list[CaptionRecord]

    @cached_property
    def image_index(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for record in self.records:
            index.setdefault(_image_key(record), len(index))
        return index

    def read(self, index: int, reduction: DecodeReduction | None = None) -> Sample | Skipped:
        record = self.records[index]
        image = self._image(record.image, index, reduction)
        if isinstance(image, Skipped):
            return image
        text = clean_caption(record.caption, self.max_words)
        return {"image": image, "text": text, "image_id": self.image_index[_image_key(record)]}


class VQADataset(_ImageFolderDataset):
    """Questions: ``{"image", "question" (cleaned), "answers" (distinct, first-seen order),
    "weights" (each answer's count / number of answers), "question_id"}``, or None for an
    unreadable image. A record without a question id gets its index."""

    records: list[VQARecord]

    def read(self, index: int, reduction: DecodeReduction | None = None) -> Sample | Skipped:
        record = self.records[index]
        image = self._image(record.image, index, reduction)
        if isinstance(image, Skipped):
            return image
        counts = Counter(record.answers)
        return {
            "image": image,
            "question": clean_question(record.question, self.max_words),
            "answers": list(counts),
            "weights": [count / len(record.answers) for count in counts.values()],
            "question_id": index if record.question_id is None else record.question_id,
        }


class InstructionDataset(_ImageFolderDataset):
    """Instruction data: ``{"image", "instruction", "text": the answer, "image_id": index}``, or
    None for an unreadable image. Text is kept as written (instructions are not captions)."""

    records: list[InstructionRecord]

    def read(self, index: int, reduction: DecodeReduction | None = None) -> Sample | Skipped:
        record = self.records[index]
        image = self._image(record.image, index, reduction)
        if isinstance(image, Skipped):
            return image
        return {"image": image, "instruction": record.instruction, "text": record.answer, "image_id": index}
