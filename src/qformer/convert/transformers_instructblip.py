"""transformers' ``InstructBlipForConditionalGeneration`` layout: its keys and its config as a
dict, to and from ours (:mod:`qformer.pretrained.transformers` reads and writes its directories).

The layout is BLIP-2's but for the Q-Former (``InstructBlipQFormerModel``: its own embeddings
with word and position tables, LayerNorm at ``embeddings.layernorm``), so the config
conversions build on BLIP-2's. The Q-Former tokenizer (transformers' processor keeps it in
``qformer_tokenizer/``) is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qformer.config import Blip2Config, ImageConfig
from qformer.convert.qformer_layouts import TRANSFORMERS_INSTRUCTBLIP_QFORMER, qformer_config_from_transformers
from qformer.convert.transformers_blip2 import (
    blip2_config_from_transformers,
    blip2_config_to_transformers,
    stage2_table,
)

TRANSFORMERS_INSTRUCTBLIP = stage2_table(TRANSFORMERS_INSTRUCTBLIP_QFORMER)
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
    """A transformers ``InstructBlipConfig`` dict for
    :func:`~qformer.pretrained.transformers.save_transformers_instructblip`."""
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
