"""The training data a recipe names, as the trainer reads it: samples whose images are augmented
reproducibly (files, tar shards, the built-in scenes), several instruction sets mixed, VQA
questions as answer targets, skipped samples refilled in the batch, and the held-out sets."""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from qformer.config import ImageConfig
from qformer.data.datasets import Skipped, skipped_count
from qformer.data.shards import ShardEnd, TarShardDataset, expand_shards
from qformer.data.transforms import DecodeReduction, crop_reduction, eval_image, train_transform
from qformer.train.config import DataSpec
from qformer.train.distributed import Runtime
from qformer.train.sampler import SetMixture

logger = logging.getLogger(__name__)


def train_sample(sample: dict, image: ImageConfig, rng: random.Random, augment: bool, same_image_key: str) -> dict:
    """A readable sample with its PIL image augmented from ``rng`` (or only resized), and its
    ``image_id`` taken from ``same_image_key``."""
    pixels = train_transform(sample["image"], image, rng) if augment else eval_image(sample["image"], image)
    return {**sample, "image": pixels, "image_id": sample[same_image_key]}


def draft_reduction(image: ImageConfig, rng: random.Random, augment: bool, draft: bool) -> DecodeReduction | None:
    """How much a sample's image may shrink as it decodes (JPEG draft mode): what its random
    crop from ``rng`` allows (:func:`~qformer.data.transforms.crop_reduction`) when it is
    augmented with ``draft`` on; else None, full size."""
    return partial(crop_reduction, config=image, rng=rng) if augment and draft else None


class TrainImages(Dataset):
    """Samples with their image augmented (BLIP-2's train transform), seeded by the sample's
    (epoch, index): the same augmentation whichever worker or process decodes it. With
    ``draft``, a JPEG decodes at the smallest scale that keeps its crop at least ``image.size``
    pixels each way (:func:`draft_reduction`)."""

    def __init__(
        self, base: Dataset, image: ImageConfig, seed: int, same_image_key: str = "image_id", augment: bool = True,
        draft: bool = True,
    ) -> None:
        self.base, self.image, self.seed, self.same_image_key = base, image, seed, same_image_key
        self.augment, self.draft = augment, draft

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict | Skipped | None:
        epoch, index = key
        rng = random.Random((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        sample = _read(self.base, index, draft_reduction(self.image, rng, self.augment, self.draft))
        if not isinstance(sample, dict) or not hasattr(sample.get("image"), "convert"):
            return sample  # skipped (counted by the collate) or already a tensor
        return train_sample(sample, self.image, rng, self.augment, self.same_image_key)


def _read(data: Dataset, index: int, reduction: DecodeReduction | None = None) -> dict | Skipped | None:
    """Sample ``index`` (decoded within ``reduction`` where the data set's ``read`` takes one);
    an unreadable one as the ``Skipped`` naming it where ``read`` can say so (file data sets),
    else None."""
    read = getattr(data, "read", None)
    return data[index] if read is None else read(index, reduction)


class TrainShards:
    """Tar-shard samples (:class:`~qformer.data.shards.TarShardDataset`) augmented as
    :class:`TrainImages`, seeded by the epoch and the sample's place (shard file name and key):
    the same augmentation whichever reader decodes it, and after a resume. ``set_epoch`` also
    deals the shards out in that epoch's order. ``draft`` as :class:`TrainImages`'s."""

    def __init__(
        self, reader: TarShardDataset, image: ImageConfig, seed: int, augment: bool = True, draft: bool = True
    ) -> None:
        self.reader, self.image, self.seed, self.augment, self.draft = reader, image, seed, augment, draft
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.reader.epoch = epoch

    def samples(self, worker: int, num_workers: int, skip: int = 0, consumed: Consumed | None = None
                ) -> Iterator[tuple[str, dict | Skipped | ShardEnd]]:
        """This rank's reader ``worker`` of ``num_workers``: (place, sample) for its samples of
        the epoch, the first ``skip`` passed over undecoded, and what ``consumed`` names (the
        shards and places an earlier run took this epoch) left out; a ShardEnd after each shard."""
        def rng(key: str) -> random.Random:
            return random.Random(f"{self.seed}:{self.epoch}:{key}")

        def reduction(key: str) -> DecodeReduction | None:
            return draft_reduction(self.image, rng(key), self.augment, self.draft)

        done, exclude = (frozenset(), frozenset()) if consumed is None else (consumed.done, consumed.places)
        reader, _ = self.reader.reader_index(worker, num_workers)
        shards = self.reader.local_shards(worker, num_workers, done)
        for place, sample in self.reader.keyed(shards, skip, reduction, reader, exclude):
            if isinstance(sample, dict):
                yield place, train_sample(sample, self.image, rng(place), self.augment, "image_id")
            else:
                yield place, sample  # Skipped (counted by the collate) or ShardEnd


@dataclass(frozen=True)
class Consumed:
    """What an epoch took so far, over every rank: the shards taken whole (``done``, by file
    name) and the places taken of the others."""

    done: frozenset[str] = frozenset()
    places: frozenset[str] = frozenset()


class RefillSkipped:
    """Collate wrapper: skipped samples (unreadable images) are counted (``skipped``; a shard's
    lost rest counts every sample it lost), named with their reason where known
    (``skipped_samples``: "name: reason" strings) and their places taken by readable samples of
    the same batch, so that every process keeps the same batch size (the stage-1 gathers need
    it). A repeated pair shares its image id, which ITC treats as the same image and ITM never
    draws as a negative. ``samples`` is how many samples the batch stands for (read or lost).
    A batch with no readable sample is only those counts with ``empty: True``: the trainer's
    batches (:mod:`qformer.train.batches`) pass over it."""

    def __init__(self, collate: Callable[[list], dict]) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> dict:
        kept = [s for s in samples if s is not None and not isinstance(s, Skipped)]
        skipped = skipped_count(samples)
        counts = {"skipped": skipped, "samples": len(kept) + skipped,
                  "skipped_samples": [f"{s.name}: {s.reason}" for s in samples if isinstance(s, Skipped)]}
        if not kept:
            return {**counts, "empty": True}
        return {**self.collate([kept[i % len(kept)] for i in range(len(samples))]), **counts}


def scene_sets(data: DataSpec, seed: int) -> tuple[Dataset, dict[str, Dataset]]:
    """The built-in scenes: drawings of the training combinations; for evaluation, new drawings
    of those combinations and drawings of the held-out combinations (one image each). With
    ``data.photographs``, crops of real photographs too, and one new crop of each held out."""
    from qformer.data.scenes import SceneDataset, all_scenes, split_scenes

    train, held_out = split_scenes(seed)
    size = max(64, data.image_size)
    evaluation = {
        "new_images": SceneDataset(train, data.eval_scenes_per_combination, seed + 1, size),
        "new_combinations": SceneDataset(held_out, data.eval_scenes_per_combination, seed + 1, size),
    }
    scenes = SceneDataset(train, data.scenes_per_combination, seed, size)
    if not data.photographs:
        return scenes, evaluation
    from qformer.data.photos import PhotoDataset

    first_id = len(all_scenes())  # a photograph is one image for ITC, whichever crop shows it
    evaluation["photographs"] = PhotoDataset(1, seed + 1, size, first_id)
    return ConcatDataset([scenes, PhotoDataset(data.photographs, seed, size, first_id)]), evaluation


def _check_file(path: str, key: str, root: str, root_key: str) -> None:
    """A data file and the folder its images are under, each named by its recipe key when missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path} is not a file")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root_key}: {root} is not a directory")


def check_data_files(data: DataSpec) -> None:
    """The recipe's data files and image folders, checked before a run writes anything into its
    folder: a mistyped path then leaves no half-made run behind to refuse the corrected command.
    Scenes need no files; shard patterns are expanded only when the run reads them."""
    if data.source in ("scenes", "shards"):
        return
    for index, entry in enumerate(data.sets or []):
        key = f"data.sets[{index}]"
        root = (entry.image_root, f"{key}.image_root") if entry.image_root else (data.image_root, "data.image_root")
        _check_file(entry.path, f"{key}.path", *root)
    if data.path:
        _check_file(data.path, "data.path", data.image_root, "data.image_root")
    if data.eval_path:
        _check_file(data.eval_path, "data.eval_path", data.image_root, "data.image_root")


def file_sets(data: DataSpec) -> tuple[Dataset, dict[str, Dataset]]:
    """Captions, instruction data or VQA questions from files; ``eval_path`` in the same format.
    VQA trains on (image, ``vqa_prompt`` with the question -> its most frequent answer). Several
    instruction sets (``data.sets``) are one :class:`MixedSets`."""
    from qformer.data.datasets import (
        CaptionDataset,
        InstructionDataset,
        VQADataset,
        read_captions,
        read_instructions,
        read_vqa,
    )

    kinds = {"captions": (CaptionDataset, read_captions), "instructions": (InstructionDataset, read_instructions),
             "vqa": (VQADataset, read_vqa)}
    dataset, read = kinds[data.source]

    def load(path: str, key: str, root: str = data.image_root, root_key: str = "data.image_root") -> Dataset:
        _check_file(path, key, root, root_key)
        return dataset(read(path), root, strict=data.strict, max_image_pixels=data.max_image_pixels)

    if data.sets:
        parts = []
        for index, entry in enumerate(data.sets):
            key = f"data.sets[{index}]"
            root = (entry.image_root, f"{key}.image_root") if entry.image_root else (data.image_root, "data.image_root")
            parts.append(load(entry.path, f"{key}.path", *root))
            if not len(parts[-1]):
                raise ValueError(f"{key}.path: {entry.path} holds no sample")
        train = MixedSets(parts, SetMixture([len(part) for part in parts], [entry.weight for entry in data.sets]))
        logger.info("instruction sets, drawn in proportion to weight x sqrt(size): %s", ", ".join(
            f"{entry.path} ({size:,} samples, p={p:.3g})"
            for entry, size, p in zip(data.sets, train.mixture.sizes, train.mixture.probabilities)))
    else:
        train = load(data.path, "data.path")
    if data.source == "vqa":
        train = VQAPairs(train, data.vqa_prompt)
    return train, ({"eval": load(data.eval_path, "data.eval_path")} if data.eval_path else {})


class MixedSets(ConcatDataset):
    """Data sets one after the other, drawn from as ``mixture`` says (the trainer's
    :class:`~qformer.train.sampler.GlobalBatchSampler` takes it); a sample's ``image_id`` is
    offset by its set's start, so that ids stay apart across sets."""

    def __init__(self, datasets: list[Dataset], mixture: SetMixture) -> None:
        super().__init__(datasets)
        self.mixture = mixture

    def read(self, index: int, reduction: DecodeReduction | None = None) -> dict | Skipped | None:
        """Sample ``index`` of the concatenation, its image decoded within ``reduction``."""
        part = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[part - 1] if part else 0
        sample = _read(self.datasets[part], index - start, reduction)
        return {**sample, "image_id": sample["image_id"] + start} if isinstance(sample, dict) else sample


class VQAPairs(Dataset):
    """VQA samples as stage 2 trains on them: ``{"image", "instruction": the prompt with the
    question, "text": the most frequent answer (the first seen on a tie), "image_id": index}``
    (:class:`~qformer.train.stage2_job.Stage2Collator` puts the loss on the answer only)."""

    def __init__(self, base: Dataset, prompt: str) -> None:
        self.base, self.prompt = base, prompt

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict | Skipped | None:
        return self.read(index)

    def read(self, index: int, reduction: DecodeReduction | None = None) -> dict | Skipped | None:
        """Sample ``index``, its image decoded within ``reduction``."""
        sample = _read(self.base, index, reduction)
        if not isinstance(sample, dict):
            return sample  # skipped
        weights = sample["weights"]
        answer = sample["answers"][max(range(len(weights)), key=weights.__getitem__)]
        return {"image": sample["image"], "instruction": self.prompt.format(sample["question"]), "text": answer,
                "image_id": index}


def shard_sets(data: DataSpec, seed: int, runtime: Runtime) -> tuple[TarShardDataset, dict[str, Any]]:
    """This rank's share of the training shards (a seeded shard order per epoch, or resampled);
    held out, shards (``.tar``, read whole into memory) or a caption file."""
    from qformer.data.datasets import CaptionDataset, read_captions

    limit = data.max_image_pixels
    train = TarShardDataset(expand_shards(data.path), rank=runtime.rank, world_size=runtime.world_size,
                            caption_key=data.caption_key, strict=data.strict, shuffle_seed=seed,
                            max_image_pixels=limit, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled)
    if not data.eval_path:
        return train, {}
    if data.eval_path.endswith(".tar"):
        held_out = TarShardDataset(expand_shards(data.eval_path), caption_key=data.caption_key, strict=data.strict,
                                   max_image_pixels=limit)
        return train, {"eval": [s for s in held_out if not isinstance(s, Skipped)]}
    return train, {"eval": CaptionDataset(read_captions(data.eval_path), data.image_root, strict=data.strict,
                                          max_image_pixels=limit)}
