"""From a training run to a model that loads in one call: the run's ``final/`` and
``qformer export RUN_DIR[/step_X] OUT``, which rebuilds a checkpoint's model
(:func:`~qformer.train.build.build_trained_model`) and writes it as ``final/`` is written
(:func:`~qformer.train.job.save_final`).

Stage 1 is written in qformer's layout (:meth:`Blip2Stage1.from_pretrained`); stage 2 and
InstructBLIP as complete transformers directories (:meth:`qformer.Blip2.from_pretrained`,
transformers' ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``):
LoRA merged into the LLM, the ``<image>`` token in config and vocabulary, one LayerNorm eps, the
trained image size and normalisation, the tokenizers."""

from __future__ import annotations

import logging
from pathlib import Path

from qformer.pretrained.auto import find_model
from qformer.train.build import build_trained_model
from qformer.train.config import load_train_config
from qformer.train.job import save_final
from qformer.train.state import STATE_NAME, WEIGHTS_NAME, check_checkpoint, latest_checkpoint

logger = logging.getLogger(__name__)
RUN_CONFIG = "config.yaml"


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` for a run folder (its last intact checkpoint) or one of its
    ``step_XXXXXXX`` folders (a ValueError when it is damaged). Any other directory is told
    apart as every command's ``--model`` is (:func:`~qformer.pretrained.auto.find_model`): one
    that holds no model fails in the same words; one that holds a model is not a checkpoint."""
    name, path = str(path), Path(path)
    if (path / WEIGHTS_NAME).is_file() and (path / STATE_NAME).is_file():
        check_checkpoint(path)
        run = path.parent
    elif (path / RUN_CONFIG).is_file():
        run, path = path, latest_checkpoint(path)
        if path is None:
            raise FileNotFoundError(f"{run} holds no checkpoint (step_XXXXXXX folder) yet")
    elif path.is_dir():
        found = find_model(name)
        raise ValueError(f"{name} is {found.described} already, neither a run folder (with {RUN_CONFIG}) nor one of "
                         "its step_XXXXXXX folders: export writes a model from a training checkpoint")
    else:
        raise FileNotFoundError(f"{path} not found")
    if not (run / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{run / RUN_CONFIG} not found: the run's recipe is needed to rebuild its model")
    return path, run


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
