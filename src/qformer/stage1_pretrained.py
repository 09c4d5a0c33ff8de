"""Stage-1 model directories, read and written with their tokenizer: qformer's layout (what
``Blip2Stage1.save_pretrained`` and a training run's ``final/`` hold: ``config.json``,
``model.safetensors``, the tokenizer's files) and transformers' ``Blip2ForImageTextRetrieval``
(``Salesforce/blip2-itm-vit-g``: its config, weights, tokenizer and image processor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from qformer.checkpoint import CONFIG_NAME, load_model, read_weights, save_model
from qformer.config import Blip2Stage1Config, ImageConfig
from qformer.convert.blip2_layouts import stage1_config_from_transformers, stage1_from_transformers
from qformer.convert.transformers_blip2 import image_config_from_directory
from qformer.devices import DeviceArg, DeviceMapArg, DtypeArg, dtype_name, parse_dtype
from qformer.loading import auto_dtype, index_checkpoint, plan_placement, resolve_checkpoint
from qformer.models.blip2 import Blip2Stage1
from qformer.tokenizer import directory_tokenizer, save_tokenizer

RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"
Layout = Literal["qformer", "transformers"]


def stage1_layout_of(values: dict) -> Layout | None:
    """The stage-1 layout a ``config.json``'s values describe, or None for anything else."""
    if values.get("model_type") == "blip-2" and RETRIEVAL_ARCHITECTURE in (values.get("architectures") or []):
        return "transformers"
    if values.get("model_type") is None and "embed_dim" in values:
        return "qformer"
    return None


def stage1_layout(directory: Path) -> Layout:
    """Which stage-1 layout a directory holds; a stage-2 or unknown model fails in one line."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: expected a stage-1 model directory (Blip2Stage1.save_pretrained's, a training "
            f"run's final/, or transformers' {RETRIEVAL_ARCHITECTURE})"
        )
    values = json.loads(file.read_text(encoding="utf-8"))
    model_type, architectures = values.get("model_type"), values.get("architectures") or []
    layout = stage1_layout_of(values)
    if layout is not None:
        return layout
    if model_type in ("blip-2", "instructblip"):
        named = ", ".join(architectures) or f"model_type {model_type!r}"
        raise ValueError(
            f"{directory} holds a stage-2 model ({named}), not stage 1: load it with qformer.Blip2.from_pretrained"
        )
    raise ValueError(
        f"{directory}: config.json (model_type {model_type!r}) is not a stage-1 BLIP-2 model; expected qformer's "
        f"stage-1 layout or transformers' {RETRIEVAL_ARCHITECTURE}"
    )


def keep_fp32(key: str, dtype: torch.dtype) -> bool:
    """In float16 only the frozen image encoder is half precision, as LAVIS runs stage 1."""
    return dtype == torch.float16 and not key.startswith("vision.")


def load_stage1(
    path_or_hub_id: str | Path, dtype: DtypeArg = None, device: DeviceArg = None, device_map: DeviceMapArg = None
) -> Blip2Stage1:
    """Either layout (detected), with the directory's tokenizer, in eval mode (see
    :meth:`Blip2Stage1.from_pretrained`)."""
    directory = resolve_checkpoint(path_or_hub_id)
    if stage1_layout(directory) == "qformer":
        model = load_model(
            Blip2Stage1, Blip2Stage1Config, directory, dtype=dtype, device=device, device_map=device_map,
            keep_fp32=keep_fp32, config_for_dtype=lambda config, name: config.replace(vision_dtype=name),
        )
    else:
        model = load_transformers_stage1(directory, dtype=dtype, device=device, device_map=device_map)
    model.tokenizer = directory_tokenizer(directory)
    return model.eval()


def load_transformers_stage1(
    directory: Path, dtype: DtypeArg = None, device: DeviceArg = None, device_map: DeviceMapArg = None
) -> Blip2Stage1:
    """A ``Blip2ForImageTextRetrieval`` directory, converted strictly; its image processor's
    size, mean and std become ``config.image`` (without one: the encoder's size, CLIP's
    statistics). That layout has no Q-Former LM head and no temperature: they start fresh and
    a log line says so. ``dtype`` None or "auto" keeps the checkpoint's; float16 as LAVIS (the
    image encoder alone); ``device``, or ``device_map`` naming one device."""
    values = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    requested = parse_dtype(dtype)
    main = auto_dtype(values, index_checkpoint(directory)) if requested == "auto" else requested
    config = stage1_config_from_transformers(values)
    image = image_config_from_directory(directory) or ImageConfig(size=config.vision.image_size)
    config = config.replace(vision_dtype=dtype_name(main), image=image.to_dict())
    model, _ = stage1_from_transformers(read_weights(directory), config)  # the image encoder in vision_dtype
    for name, param in model.named_parameters():
        if param.is_floating_point() and not keep_fp32(name, main):
            param.data = param.data.to(main)
    placement = plan_placement(model, device, device_map, lambda key: main, llm_attr=None)
    return model.to(placement.main)


def save_stage1(model: Blip2Stage1, directory: str | Path) -> None:
    """qformer's layout: ``config.json``, ``model.safetensors`` and the tokenizer (when the
    model has one), every file written atomically."""
    save_model(model, model.config, directory)
    save_tokenizer(model.tokenizer, Path(directory))
