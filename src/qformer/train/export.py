"""From a training run to a model that loads in one call: the run's ``final/`` and
``qformer export RUN_DIR[/step_X] OUT``.

Stage 1 is written in qformer's layout (:meth:`Blip2Stage1.from_pretrained`); stage 2 and
InstructBLIP as complete transformers directories (:meth:`qformer.Blip2.from_pretrained`,
transformers' ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``):
LoRA merged into the LLM, the ``<image>`` token in config and vocabulary, one LayerNorm eps, the
trained image size and normalisation, the tokenizers."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from qformer.train.config import TrainConfig, load_train_config
from qformer.train.state import STATE_NAME, WEIGHTS_NAME, check_checkpoint, latest_checkpoint, load_trainable

logger = logging.getLogger(__name__)
RUN_CONFIG = "config.yaml"


def _write_model(model: nn.Module, directory: Path) -> None:
    from qformer.convert.command import align_ln_vision_eps
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
    """``model`` written into ``directory`` whole or not at all: into a staging folder beside it,
    then renamed into place (an older ``directory`` is replaced only once the new one is complete)."""
    directory = Path(directory)
    staging = directory.with_name(f".staging_{directory.name}")
    if staging.exists():
        shutil.rmtree(staging)
    _write_model(model, staging)
    if directory.exists():
        old = directory.with_name(f".old_{directory.name}")
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old)
    else:
        staging.rename(directory)
    return directory


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` for a run folder (its last intact checkpoint) or one of its
    ``step_XXXXXXX`` folders (a ValueError when it is damaged)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file() and (path / STATE_NAME).is_file():
        check_checkpoint(path)
        run = path.parent
    elif (path / RUN_CONFIG).is_file():
        run, path = path, latest_checkpoint(path)
        if path is None:
            raise FileNotFoundError(f"{run} holds no checkpoint (step_XXXXXXX folder) yet")
    elif path.is_dir():
        raise ValueError(f"{path} is neither a run folder (with {RUN_CONFIG}) nor one of its step_XXXXXXX folders")
    else:
        raise FileNotFoundError(f"{path} not found")
    if not (run / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{run / RUN_CONFIG} not found: the run's recipe is needed to rebuild its model")
    return path, run


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


def export_run(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """``qformer export``: the checkpoint at ``source`` (a run folder: its last) written to
    ``out`` as the run's ``final/`` is written."""
    checkpoint, run = find_checkpoint(source)
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise ValueError(f"{out} exists and is not empty: choose another directory or pass --overwrite")
    config = load_train_config(run / RUN_CONFIG)
    logger.info("exporting %s (%s)", checkpoint, config.model.stage)
    return save_final(build_trained_model(config, checkpoint), out)
