"""transformers' ``Blip2ForConditionalGeneration`` directories: config, weights, processor
settings and tokenizer, to and from :class:`~qformer.models.blip2.Blip2Stage2Model`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qformer.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write
from qformer.config import CLIP_MEAN, CLIP_STD, Blip2Config, ImageConfig, VisionConfig
from qformer.convert.blip2_layouts import TRANSFORMERS_VISION
from qformer.convert.qformer_layouts import TRANSFORMERS_BLIP2_QFORMER, qformer_config_from_transformers
from qformer.convert.rename import ConversionReport, RenameTable
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

logger = logging.getLogger(__name__)

PREPROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"

def stage2_table(qformer: RenameTable) -> RenameTable:
    """A stage-2 model's keys: vision, ``ln_vision``, queries, the Q-Former (``qformer``'s
    layout under ``qformer.``), the projection and the LLM's own keys."""
    return (
        TRANSFORMERS_VISION.under("vision_model.", "vision.")
        + RenameTable(
            (
                ("vision_model.post_layernorm.", "ln_vision."),
                ("query_tokens", "query_tokens"),
                ("language_projection.", "language_projection."),
                ("language_model.", "language_model."),
            )
        )
        + qformer.under("qformer.", "qformer.")
    )


TRANSFORMERS_BLIP2 = stage2_table(TRANSFORMERS_BLIP2_QFORMER)
"""``Blip2ForConditionalGeneration``."""

_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
)


def fill_tied(module: nn.Module, state_dict: dict[str, Tensor], report: ConversionReport) -> None:
    """A checkpoint stores one tensor of each tied group: give the others the same one."""
    for group in tied_parameters(module):
        present = [k for k in group if k in state_dict]
        if not present:
            continue
        for key in group:
            if key not in state_dict:
                state_dict[key] = state_dict[present[0]]
                report.dropped[key] = f"tied to {present[0]}: not stored"


def blip2_config_from_transformers(values: Mapping[str, Any], image: ImageConfig | None = None) -> Blip2Config:
    """Our config from a transformers ``Blip2Config`` dict (``config.json``)."""
    if values.get("model_type") != "blip-2":
        raise ValueError(f"not a BLIP-2 config: model_type is {values.get('model_type')!r}")
    vision = values["vision_config"]
    text = dict(values["text_config"])
    return Blip2Config(
        vision=VisionConfig(**{f: vision[f] for f in _VISION_FIELDS if f in vision}),
        qformer=qformer_config_from_transformers(values["qformer_config"]),
        text_config=text,
        num_query_tokens=values.get("num_query_tokens", 32),
        ln_vision_eps=vision.get("layer_norm_eps", 1e-6),
        image_token_index=values.get("image_token_index"),
        text_suffix="\n" if text.get("model_type") == "opt" else "",
        image=image or ImageConfig(size=vision.get("image_size", 224)),
    )


def blip2_config_to_transformers(config: Blip2Config) -> dict[str, Any]:
    """A transformers ``Blip2Config`` dict for :func:`save_transformers_blip2`."""
    from transformers import Blip2Config as TransformersBlip2Config

    if config.vision is None:
        raise ValueError("transformers' layout needs the image encoder: config.vision is None")
    if config.image_token_index is None:
        raise ValueError(
            "transformers' layout marks the queries with an image token: set config.image_token_index to an id "
            "of the LLM vocabulary reserved for it"
        )
    q = config.qformer
    qformer = {name: getattr(q, name) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "initializer_range",
        "layer_norm_eps", "pad_token_id", "cross_attention_frequency", "encoder_hidden_size")}
    qformer["use_qformer_text_input"] = q.use_text_input
    vision = {f: getattr(config.vision, f) for f in _VISION_FIELDS}
    if config.ln_vision_eps != config.vision.layer_norm_eps:
        raise ValueError(
            f"transformers uses one LayerNorm eps for the encoder and ln_vision: {config.vision.layer_norm_eps} vs "
            f"{config.ln_vision_eps}"
        )
    tf = TransformersBlip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=config.text_config,
        num_query_tokens=config.num_query_tokens,
        image_token_index=config.image_token_index,
    )
    return tf.to_dict()


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


def preprocessor_dict(image: ImageConfig) -> dict[str, Any]:
    return {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True,
        "size": {"height": image.size, "width": image.size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image.mean),
        "image_std": list(image.std),
        "do_convert_rgb": True,
    }


def processor_dict(processor_class: str, image: ImageConfig, num_query_tokens: int | None) -> dict[str, Any]:
    """``processor_config.json`` as transformers 5 writes it for ``processor_class``
    (``Blip2Processor``, ``InstructBlipProcessor``): the image processor nested, and
    ``num_query_tokens``, without which the processor puts no ``<image>`` token in the text and a
    model with an LLM then silently drops the image. A retrieval model's is None: its text goes
    to the Q-Former as it is, with no place kept for the queries."""
    return {"processor_class": processor_class, "num_query_tokens": num_query_tokens,
            "image_processor": preprocessor_dict(image)}


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
