"""``qformer eval``: a run's checkpoint (``step_XXXXXXX/``) or its ``final/`` model evaluated on
the held-out data of the run's ``config.yaml`` (or of a recipe)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qformer.checkpoint import atomic_write
from qformer.train.build import build_job
from qformer.train.config import TrainConfig, load_train_config
from qformer.train.distributed import Runtime, setup_runtime
from qformer.train.job import Job
from qformer.train.state import WEIGHTS_NAME, check_checkpoint, latest_checkpoint, load_checkpoint

logger = logging.getLogger(__name__)


def run_target(target: str | Path) -> tuple[Path, Path]:
    """``(run folder, what to evaluate)`` for a run folder (its latest intact checkpoint), a
    ``step_XXXXXXX/`` folder (checked: a ValueError when damaged) or a ``final/`` folder of a run."""
    target = Path(target)
    if not target.is_dir():
        raise FileNotFoundError(f"{target} is not a run folder, a step_XXXXXXX/ checkpoint or a final/ folder")
    if (target / "config.yaml").is_file():
        checkpoint = latest_checkpoint(target)
        if checkpoint is None:
            raise FileNotFoundError(f"{target} holds no checkpoint (step_XXXXXXX/) to evaluate")
        return target, checkpoint
    if not (target.parent / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{target.parent} has no config.yaml (is {target} in a run folder?); with a recipe: "
            f"qformer eval RECIPE --checkpoint {target}"
        )
    if (target / WEIGHTS_NAME).is_file():
        check_checkpoint(target)
    return target.parent, target


def evaluate_run(target: str | Path, overrides: list[str] = (), out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate :func:`run_target`'s checkpoint with the run's own config (plus ``overrides``)."""
    run_dir, checkpoint = run_target(target)
    return _evaluate(load_train_config(run_dir / "config.yaml", list(overrides)), checkpoint, out)


def _final_config(config: TrainConfig, final: Path) -> TrainConfig:
    """The recipe without the weight sources that ``final/`` replaces: stage 1 loads no image
    encoder or BERT weights (the saved model holds them), stage 2 starts from the directory."""
    spec = config.model
    if spec.stage == "stage1":
        model = spec.replace(vision_weights=None, bert=None, tokenizer=spec.tokenizer or spec.bert)
    else:
        model = spec.replace(blip2=str(final), init_from=None, language_model=None, lora_r=0)
    return config.replace(model=model.to_dict())


def _load(config: TrainConfig, checkpoint: Path, runtime: Runtime) -> tuple[Job, nn.Module]:
    """The job, and the model to evaluate: a checkpoint's trained weights in the recipe's model,
    or the ``final/`` directory as saved (stage 1: ``Blip2Stage1.from_pretrained``; stage 2
    and InstructBLIP: ``Blip2.from_pretrained``, the job's own model)."""
    if (checkpoint / WEIGHTS_NAME).is_file():
        job = build_job(config, runtime)
        load_checkpoint(checkpoint, job.model, rank=0)
        return job, job.model
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is neither a step_XXXXXXX/ checkpoint ({WEIGHTS_NAME}) "
                                "nor a saved model (config.json)")
    job = build_job(_final_config(config, checkpoint), runtime)
    if config.model.stage != "stage1":
        return job, job.model
    from qformer.pretrained.stage1 import Blip2Stage1

    return job, Blip2Stage1.from_pretrained(checkpoint)


def evaluate_checkpoint(config: TrainConfig, checkpoint: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a ``step_XXXXXXX/`` (checked: a ValueError when damaged) or ``final/`` folder on
    ``config``'s held-out data; the results go to ``out`` (default ``<checkpoint>/eval.json``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} is not a folder")
    if (checkpoint / WEIGHTS_NAME).is_file():
        check_checkpoint(checkpoint)
    return _evaluate(config, checkpoint, out)


def _evaluate(config: TrainConfig, checkpoint: Path, out: str | Path | None) -> dict[str, Any]:
    """:func:`evaluate_checkpoint` on a folder already checked."""
    runtime = setup_runtime(config.device)
    if runtime.world_size > 1:
        raise ValueError("qformer eval runs on one process")
    torch.manual_seed(config.seed)  # the untrained (frozen) weights as the run drew them
    job, model = _load(config, checkpoint, runtime)
    if job.evaluate is None:
        raise ValueError("the recipe has no held-out data to evaluate on (data.eval_path, or data.source: scenes)")
    model = model.to(runtime.device).eval()
    results = job.evaluate(model)
    target = Path(out) if out else checkpoint / "eval.json"
    text = json.dumps(results, indent=2)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    logger.info("%s: %s (written to %s)", checkpoint, ", ".join(
        f"{k} {v}" for k, v in results.items() if isinstance(v, (int, float))), target)
    return results
