"""One call for any model directory (or hub id): :func:`find_model` tells what it holds from its
``config.json`` (a stage-1 model in qformer's layout or transformers' Blip2ForImageTextRetrieval,
a stage-2 BLIP-2, an InstructBLIP), :func:`load_pretrained` loads it with the right class. A
directory that holds none of them fails here, in the same words whoever asked (``qformer
caption``, ``vqa``, ``retrieve``, ``eval --model``, ``serve``, ``export``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qformer.checkpoint import CONFIG_NAME
from qformer.devices import DeviceArg, DeviceMapArg, DtypeArg
from qformer.loading import resolve_checkpoint
from qformer.pretrained.stage1 import Blip2Stage1, Layout, stage1_layout_of
from qformer.pretrained.stage2 import Blip2, InstructBlip

Kind = Literal["stage1", "blip2", "instructblip"]
MODEL_DIRECTORIES = ("a training run's final/, qformer export's or save_pretrained's output, transformers' BLIP-2, "
                     "InstructBLIP or Blip2ForImageTextRetrieval")
RUN_RECIPE = "config.yaml"  # what marks a training run's folder (qformer train writes its recipe there)


@dataclass(frozen=True)
class ModelDirectory:
    """What :func:`find_model` found: ``name`` as given (a path or hub id), the local
    ``directory``, the ``kind`` of model and, for stage 1, its ``layout``."""

    name: str
    directory: Path
    kind: Kind
    layout: Layout | None
    model_type: str | None
    architectures: tuple[str, ...]

    @property
    def described(self) -> str:
        """``a stage-1 model (...)`` or ``a stage-2 model (its architecture)``, for messages."""
        if self.kind == "stage1":
            return "a stage-1 model (image-text matching, no LLM)"
        return f"a stage-2 model ({', '.join(self.architectures) or f'model_type {self.model_type!r}'})"


def find_model(path_or_hub_id: str | Path | ModelDirectory) -> ModelDirectory:
    """What a directory (or hub id, downloaded unless the hub is offline) holds, from its
    ``config.json`` alone; no weights are read. A directory with no ``config.json``, or with the
    ``config.json`` of another kind of model, fails in one line that names what is expected."""
    if isinstance(path_or_hub_id, ModelDirectory):
        return path_or_hub_id
    name = str(path_or_hub_id)
    directory = training_output(name, Path(resolve_checkpoint(path_or_hub_id)))
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{name} holds no config.json: expected a model directory ({MODEL_DIRECTORIES})")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: config.json is not JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{name}: config.json is not a JSON object")
    model_type, architectures = values.get("model_type"), tuple(values.get("architectures") or ())
    layout = stage1_layout_of(values)
    if layout is not None:
        kind: Kind = "stage1"
    elif model_type in ("blip-2", "instructblip"):
        kind = "blip2" if model_type == "blip-2" else "instructblip"
    else:
        what = "no model_type" if model_type is None else f"model_type {model_type!r}"
        raise ValueError(f"{name}: config.json ({what}) is not a stage-1 BLIP-2 model, a BLIP-2 or an "
                         f"InstructBLIP: expected a model directory ({MODEL_DIRECTORIES})")
    return ModelDirectory(name, directory, kind, layout, model_type, architectures)


def training_output(name: str, directory: Path) -> Path:
    """The model a training run's folder stands for, so that every command that takes a model
    takes a run as ``qformer eval`` and ``qformer export`` do: a run folder means its ``final/``.
    A run that has not finished, or one of its ``step_XXXXXXX/`` checkpoints (trainable weights
    and optimizer state, not a model), fails in one line that names ``qformer export``, which
    writes such a checkpoint as a model; any other directory is returned as it is."""
    if (directory / CONFIG_NAME).is_file():
        return directory
    if (directory / RUN_RECIPE).is_file():
        final = directory / "final"
        if (final / CONFIG_NAME).is_file():
            return final
        raise FileNotFoundError(f"{name} is a training run with no final/ yet (written when training ends): write "
                                f"its last checkpoint as a model with qformer export {name} OUT, and pass OUT")
    if (directory.parent / RUN_RECIPE).is_file():
        raise ValueError(f"{name} is a training checkpoint, not a model: pass the run's final/, or write this "
                         f"checkpoint as a model with qformer export {name} OUT and pass OUT")
    return directory


def load_pretrained(
    path_or_hub_id: str | Path | ModelDirectory,
    *,
    dtype: DtypeArg = None,
    device: DeviceArg = None,
    device_map: DeviceMapArg = None,
    max_memory: Mapping | None = None,
    quantization_config: Any = None,
) -> Blip2Stage1 | Blip2:
    """The model a directory (or hub id, or what :func:`find_model` found) holds, loaded by its
    class's ``from_pretrained``: :class:`Blip2Stage1`, :class:`Blip2` or :class:`InstructBlip`.
    ``dtype``, ``device`` and ``device_map`` as those take them; ``max_memory`` and
    ``quantization_config`` are for the stage-2 models (their LLM)."""
    found = find_model(path_or_hub_id)
    if found.kind == "stage1":
        if max_memory is not None or quantization_config is not None:
            raise ValueError(f"{found.name} holds {found.described}: max_memory and quantization_config are for "
                             "stage-2 models")
        return Blip2Stage1.from_pretrained(found.directory, dtype=dtype, device=device, device_map=device_map)
    model_class = InstructBlip if found.kind == "instructblip" else Blip2
    return model_class.from_pretrained(found.directory, dtype=dtype, device=device, device_map=device_map,
                                       max_memory=max_memory, quantization_config=quantization_config)
