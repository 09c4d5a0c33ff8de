"""transformers' directories: ``Blip2ForConditionalGeneration``, ``InstructBlipForConditionalGeneration``
and the stage-1 ``Blip2ForImageTextRetrieval`` built from their files (config, weights, processor
settings), and written back. The key tables and config mappings are :mod:`qformer.convert`'s."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

from qformer.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write, load_state_dict_strict
from qformer.config import CLIP_MEAN, CLIP_STD, Blip2Config, Blip2Stage1Config, ImageConfig
from qformer.convert.blip2_layouts import (
    TRANSFORMERS_STAGE1_SOURCE,
    fill_fresh_stage1,
    stage1_state_from_transformers,
)
from qformer.convert.rename import ConversionReport, RenameTable
from qformer.convert.transformers_blip2 import (
    TRANSFORMERS_BLIP2,
    blip2_config_from_transformers,
    blip2_config_to_transformers,
    preprocessor_dict,
    processor_dict,
)
from qformer.convert.transformers_instructblip import (
    TRANSFORMERS_INSTRUCTBLIP,
    instructblip_config_from_transformers,
    instructblip_config_to_transformers,
)
from qformer.devices import DeviceArg, DeviceMapArg, DtypeArg, dtype_name, parse_dtype
from qformer.loading import (
    auto_dtype,
    build_empty,
    index_checkpoint,
    keep_fp32_rule,
    load_checkpoint,
    load_quantized_llm,
    tied_parameters,
)
from qformer.models.blip2 import Blip2Stage1Model
from qformer.models.instructblip import InstructBlipStage2Model

M = TypeVar("M", bound=Blip2Stage1Model)  # the class a builder builds: the architecture or what users load

logger = logging.getLogger(__name__)

PREPROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"


def image_config_from_directory(path: Path) -> ImageConfig | None:
    """Size, mean and std of a ``BlipImageProcessor``, where transformers reads them: the
    ``image_processor`` entry of ``processor_config.json`` (transformers 5 writes it), else
    ``preprocessor_config.json``."""
    values = None
    if (path / PROCESSOR_NAME).is_file():
        values = json.loads((path / PROCESSOR_NAME).read_text(encoding="utf-8")).get("image_processor")
    if values is None and (path / PREPROCESSOR_NAME).is_file():
        values = json.loads((path / PREPROCESSOR_NAME).read_text(encoding="utf-8"))
    if values is None:
        return None
    size = values.get("size", {})
    side = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else int(size)
    return ImageConfig(size=side, mean=tuple(values.get("image_mean", CLIP_MEAN)), std=tuple(values.get("image_std", CLIP_STD)))


def load_transformers_layout(
    directory: str | Path,
    table: RenameTable,
    config_from: Callable[..., Blip2Config],
    model_cls: type,
    reference: type,
    dtype: DtypeArg = None,
    device: DeviceArg = None,
    device_map: DeviceMapArg = None,
    max_memory: Mapping | None = None,
    quantization_config: Any = None,
    **kwargs: Any,
):
    """``model_cls(config_from(config.json, preprocessing), **kwargs)`` built on the meta device,
    the directory's weights renamed through ``table``, checked strictly and loaded in ``dtype``
    (transformers' meaning: None or "auto" keeps the checkpoint's), where ``reference`` (the
    transformers class of the layout) and the LLM keep fp32, on ``device`` or over
    ``device_map``. A ``quantization_config`` (transformers', e.g. ``BitsAndBytesConfig``)
    quantises the LLM as transformers loads it. Returns the model and the report."""
    directory = Path(directory)
    values = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    stored = index_checkpoint(directory)
    ours, report = table.to_ours(stored)
    report.raise_if_unmatched(f"transformers {values.get('model_type')} ({directory})")
    requested = parse_dtype(dtype)
    main = auto_dtype(values, stored) if requested == "auto" else requested
    name = dtype_name(main)
    config = config_from(values, image_config_from_directory(directory)).replace(vision_dtype=name, llm_dtype=name)
    llm = None
    if quantization_config is not None:
        llm = load_quantized_llm(directory, config.text_config, quantization_config, main, device, device_map)
        if isinstance(device_map, Mapping):  # the rest of the map places the BLIP-2 part
            device_map = {k: v for k, v in device_map.items() if not k.startswith("language_model")} or None
    model = build_empty(lambda: model_cls(config, language_model=llm, **kwargs))
    llm = model.language_model
    rule = keep_fp32_rule(
        [*(reference._keep_in_fp32_modules or ()), *(llm._keep_in_fp32_modules or ())],
        [*(reference._keep_in_fp32_modules_strict or ()), *(llm._keep_in_fp32_modules_strict or ())],
    )
    theirs = {key: item.name for key, item in ours.items()}
    for group in tied_parameters(model):
        present = [k for k in group if k in ours]
        report.dropped.update({k: f"tied to {present[0]}: not stored" for k in group if present and k not in ours})
    load_checkpoint(model, ours, dtype=main, device=device, device_map=device_map, max_memory=max_memory,
                    keep_fp32=lambda key, dt: rule(theirs.get(key, key), dt), llm_loaded=quantization_config is not None)
    return model, report


def save_transformers_layout(
    model: nn.Module, table: RenameTable, transformers_config: dict[str, Any], image: ImageConfig, directory: str | Path,
    processor_class: str,
) -> ConversionReport:
    """Write ``config.json``, ``model.safetensors`` (keys through ``table``, one tensor per tied
    group), ``processor_config.json`` (``processor_class``, see :func:`processor_dict`) and, for
    readers older than transformers 5, ``preprocessor_config.json``, each file atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tied = {key: group[0] for group in tied_parameters(model) for key in group[1:]}
    theirs, report = table.to_theirs({k: v for k, v in model.state_dict().items() if k not in tied})
    report.raise_if_unmatched("qformer")
    report.dropped.update({key: f"tied to {kept}: stored once" for key, kept in tied.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in theirs.items()}
    config_text = json.dumps(transformers_config, indent=2) + "\n"
    preprocessor = json.dumps(preprocessor_dict(image), indent=2) + "\n"
    processor = json.dumps(processor_dict(processor_class, image, transformers_config["num_query_tokens"]),
                           indent=2) + "\n"
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8"))
    atomic_write(directory / PREPROCESSOR_NAME, lambda tmp: Path(tmp).write_text(preprocessor, encoding="utf-8"))
    atomic_write(directory / PROCESSOR_NAME, lambda tmp: Path(tmp).write_text(processor, encoding="utf-8"))
    return report


def load_transformers_blip2(directory: str | Path, model_cls: type, **options: Any):
    """A :class:`Blip2Stage2Model` (``model_cls``) from a transformers BLIP-2 directory, and the report;
    ``options`` are :func:`load_transformers_layout`'s."""
    from transformers import Blip2ForConditionalGeneration

    return load_transformers_layout(directory, TRANSFORMERS_BLIP2, blip2_config_from_transformers, model_cls,
                                    Blip2ForConditionalGeneration, **options)


def save_transformers_blip2(model: nn.Module, config: Blip2Config, directory: str | Path) -> ConversionReport:
    """transformers' ``Blip2ForConditionalGeneration`` directory (see :func:`save_transformers_layout`)."""
    return save_transformers_layout(model, TRANSFORMERS_BLIP2, blip2_config_to_transformers(config), config.image,
                                    directory, "Blip2Processor")


def load_transformers_instructblip(
    directory: str | Path, model_cls: type = InstructBlipStage2Model, **options: Any
) -> tuple[nn.Module, ConversionReport]:
    """An :class:`InstructBlipStage2Model` (``model_cls``) from a transformers InstructBLIP directory,
    and the report; ``options`` are :func:`load_transformers_layout`'s (dtype, device, ...)."""
    from transformers import InstructBlipForConditionalGeneration

    return load_transformers_layout(directory, TRANSFORMERS_INSTRUCTBLIP, instructblip_config_from_transformers,
                                    model_cls, InstructBlipForConditionalGeneration, **options)


def save_transformers_instructblip(model: nn.Module, config: Blip2Config, directory: str | Path) -> ConversionReport:
    """transformers' ``InstructBlipForConditionalGeneration`` directory, each file atomically."""
    return save_transformers_layout(model, TRANSFORMERS_INSTRUCTBLIP, instructblip_config_to_transformers(config),
                                    config.image, directory, "InstructBlipProcessor")


def stage1_from_transformers(
    state_dict: Mapping[str, Tensor], config: Blip2Stage1Config, model_cls: type[M] = Blip2Stage1Model
) -> tuple[M, ConversionReport]:
    """A stage-1 model (``model_cls``) from a ``Blip2ForImageTextRetrieval`` state dict. That layout has no
    Q-Former LM head and no temperature: both start fresh (the temperature at
    ``config.temperature``) and the report says so."""
    ours, report = stage1_state_from_transformers(state_dict)
    model = model_cls(config)
    fill_fresh_stage1(ours, report, model.state_dict(), TRANSFORMERS_STAGE1_SOURCE, config.temperature)
    load_state_dict_strict(model, ours)
    return model, report
