"""transformers' ``Blip2ForConditionalGeneration`` layout: its keys, its config and processor
settings as dicts, to and from ours. Reading and writing its directories is
:mod:`qformer.pretrained.transformers`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qformer.config import Blip2Config, ImageConfig, VisionConfig
from qformer.convert.blip2_layouts import TRANSFORMERS_VISION
from qformer.convert.qformer_layouts import TRANSFORMERS_BLIP2_QFORMER, qformer_config_from_transformers
from qformer.convert.rename import RenameTable


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
    """A transformers ``Blip2Config`` dict for :func:`~qformer.pretrained.transformers.save_transformers_blip2`."""
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
