"""From a recipe to what the loop runs: the job of the recipe's stage (:mod:`~qformer.train.stage1_job`
or :mod:`~qformer.train.stage2_job`) on the recipe's data (:mod:`~qformer.train.data`), and the
stage's model with a checkpoint's trained weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qformer.config import ImageConfig
from qformer.train.config import TrainConfig
from qformer.train.data import (
    MixedSets,
    RefillSkipped,
    TrainImages,
    TrainShards,
    check_data_files,
    file_sets,
    scene_sets,
    shard_sets,
)
from qformer.train.distributed import Runtime
from qformer.train.job import Job, check_sources
from qformer.train.state import load_trainable


def check_recipe(config: TrainConfig) -> None:
    """What can be checked of a recipe without loading anything (its data files, its model paths,
    whether its data fits its stage), so that a run refuses a mistake before it writes into its
    folder: a run that fails there leaves nothing behind that refuses the corrected command."""
    if config.data.source in ("instructions", "vqa") and config.model.stage != "stage2":
        raise ValueError(f"data.source {config.data.source} trains stage 2 (model.stage: stage2)")
    check_data_files(config.data)
    check_sources(config.model)


def build_job(config: TrainConfig, runtime: Runtime) -> Job:
    from qformer.train import stage1_job, stage2_job

    check_recipe(config)
    source = config.data.source
    image = ImageConfig(size=config.data.image_size)
    mixture = None
    if source == "shards":
        reader, evaluation = shard_sets(config.data, config.seed, runtime)
        dataset = TrainShards(reader, image, config.seed, config.data.augment, config.data.draft_decode)
    else:
        train, evaluation = scene_sets(config.data, config.seed) if source == "scenes" else file_sets(config.data)
        # scenes: drawings of one colour/shape/count/position combination count as the same image
        same_image = "scene_id" if source == "scenes" else "image_id"
        dataset = TrainImages(train, image, config.seed, same_image, config.data.augment, config.data.draft_decode)
        mixture = train.mixture if isinstance(train, MixedSets) else None
    build = stage1_job.build if config.model.stage == "stage1" else stage2_job.build
    job = build(config, runtime, dataset, evaluation, image)
    job.collate = RefillSkipped(job.collate)
    job.mixture = mixture
    return job


def build_trained_model(config: TrainConfig, checkpoint: Path) -> nn.Module:
    """The run's model as its recipe builds it (frozen parts from their paths), with the
    checkpoint's trained weights. Seeded as the run was, so that a part left at its random
    initialisation (an image encoder without ``model.vision_weights``) comes back the same."""
    torch.manual_seed(config.seed)
    if config.model.stage == "stage1":
        from qformer.train.stage1_job import build_model

        model, _ = build_model(config)
    else:
        from qformer.train.stage2_job import build_model

        model = build_model(config)
    load_trainable(checkpoint, model)
    return model.eval()
