"""transformers' ``InstructBlipForConditionalGeneration`` directories: config, weights and
processor settings, to and from :class:`~qformer.models.instructblip.InstructBlipStage2`.

The layout is BLIP-2's but for the Q-Former (``InstructBlipQFormerModel``: its own embeddings
with word and position tables, LayerNorm at ``embeddings.layernorm``), so the config
conversions build on BLIP-2's. The Q-Former tokenizer (transformers' processor keeps it in
``qformer_tokenizer/``) is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from qformer.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write, load_state_dict_strict, read_weights
from qformer.config import Blip2Config, ImageConfig
from qformer.convert.blip2_layouts import TRANSFORMERS_VISION
from qformer.convert.qformer_layouts import TRANSFORMERS_INSTRUCTBLIP_QFORMER, qformer_config_from_transformers
from qformer.convert.rename import ConversionReport, RenameTable
from qformer.convert.transformers_blip2 import (
    PREPROCESSOR_NAME,
    blip2_config_from_transformers,
    blip2_config_to_transformers,
    fill_tied,
    image_config_from_preprocessor,
    preprocessor_dict,
    tied_groups,
)
from qformer.models.instructblip import InstructBlipStage2

TRANSFORMERS_INSTRUCTBLIP = (
    TRANSFORMERS_VISION.under("vision_model.", "vision.")
    + RenameTable(
        (
            ("vision_model.post_layernorm.", "ln_vision."),
            ("query_tokens", "query_tokens"),
            ("language_projection.", "language_projection."),
            ("language_model.", "language_model."),
        )
    )
    + TRANSFORMERS_INSTRUCTBLIP_QFORMER.under("qformer.", "qformer.")
)
"""``InstructBlipForConditionalGeneration``: vision, Q-Former, projection, the LLM's own keys."""

_BLIP2_ONLY = ("model_type", "use_qformer_text_input")  # sub-config keys that InstructBLIP's lack


def instructblip_config_from_transformers(values: Mapping[str, Any], image: ImageConfig | None = None) -> Blip2Config:
    """Our config from a transformers ``InstructBlipConfig`` dict (``config.json``): BLIP-2's
    fields, the Q-Former with its text path, no caption suffix (InstructBLIP's LLMs end on eos)."""
    if values.get("model_type") != "instructblip":
        raise ValueError(f"not an InstructBLIP config: model_type is {values.get('model_type')!r}")
    # every field but the Q-Former's is BLIP-2's, read by BLIP-2's conversion
    config = blip2_config_from_transformers({**values, "model_type": "blip-2"}, image)
    qformer = qformer_config_from_transformers(values["qformer_config"], "instructblip")
    return config.replace(qformer=qformer, text_suffix="")


def instructblip_config_to_transformers(config: Blip2Config) -> dict[str, Any]:
    """A transformers ``InstructBlipConfig`` dict for :func:`save_transformers_instructblip`."""
    from transformers import InstructBlipConfig

    if not config.qformer.use_text_input:
        raise ValueError("InstructBLIP's Q-Former reads the instruction: config.qformer.use_text_input must be True")
    blip2 = blip2_config_to_transformers(config)  # BLIP-2's checks and sub-configs
    vision, qformer = ({k: v for k, v in blip2[name].items() if k not in _BLIP2_ONLY}
                       for name in ("vision_config", "qformer_config"))
    tf = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=blip2["text_config"],
        num_query_tokens=config.num_query_tokens,
        image_token_index=config.image_token_index,
    )
    return tf.to_dict()


def load_transformers_instructblip(
    directory: str | Path, model_cls: type = InstructBlipStage2, **model_kwargs: Any
) -> tuple[nn.Module, ConversionReport]:
    """Build ``model_cls(config, **model_kwargs)`` (an :class:`InstructBlipStage2`) from a
    transformers InstructBLIP directory and load its weights strictly; returns the model and
    the report."""
    directory = Path(directory)
    values = json.loads((directory / CONFIG_NAME).read_text())
    config = instructblip_config_from_transformers(values, image_config_from_preprocessor(directory))
    model = model_cls(config, **model_kwargs)
    ours, report = TRANSFORMERS_INSTRUCTBLIP.to_ours(read_weights(directory))
    report.raise_if_unmatched(f"transformers InstructBLIP ({directory})")
    fill_tied(model, ours, report)
    load_state_dict_strict(model, ours)
    return model, report


def save_transformers_instructblip(model: nn.Module, config: Blip2Config, directory: str | Path) -> ConversionReport:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` in
    transformers' InstructBLIP layout, each file atomically; one tensor per tied group."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tf_config = instructblip_config_to_transformers(config)
    tied = {key: group[0] for group in tied_groups(model) for key in group[1:]}
    theirs, report = TRANSFORMERS_INSTRUCTBLIP.to_theirs({k: v for k, v in model.state_dict().items() if k not in tied})
    report.raise_if_unmatched("qformer InstructBLIP")
    report.dropped.update({key: f"tied to {kept}: stored once" for key, kept in tied.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in theirs.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(tf_config, indent=2) + "\n"))
    preprocessor = json.dumps(preprocessor_dict(config.image), indent=2) + "\n"
    atomic_write(directory / PREPROCESSOR_NAME, lambda tmp: Path(tmp).write_text(preprocessor))
    return report
