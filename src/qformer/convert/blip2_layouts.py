"""Whole-model layouts of BLIP-2's stage 1: transformers' ``Blip2ForImageTextRetrieval`` and
LAVIS's ``Blip2Qformer`` checkpoints (``.pth`` state dicts)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qformer.config import Blip2Stage1Config, VisionConfig
from qformer.convert.qformer_layouts import (
    BERT_ENCODER,
    BERT_LM_HEAD,
    TEXT_EMBEDDINGS,
    check_tied_decoder,
    layer_rules,
    qformer_config_from_transformers,
)
from qformer.convert.rename import ConversionReport, RenameTable

logger = logging.getLogger(__name__)

_VISION_BLOCK = (("layer_norm1.", "norm1."), ("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj."),
                 ("layer_norm2.", "norm2."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))

TRANSFORMERS_VISION = RenameTable(
    rules=(
        ("embeddings.class_embedding", "class_embedding"),
        ("embeddings.position_embedding", "position_embedding"),
        ("embeddings.patch_embedding.", "patch_embedding."),
    )
    + tuple((f"encoder.layers.{{i}}.{a}", f"layers.{{i}}.{b}") for a, b in _VISION_BLOCK)
)
"""``Blip2VisionModel`` without its ``post_layernorm`` (ours is ``ln_vision``, outside the tower)."""

LAVIS_VISION = RenameTable(
    rules=(
        ("cls_token", "class_embedding"),
        ("pos_embed", "position_embedding"),
        ("patch_embed.proj.", "patch_embedding."),
    )
    + tuple(
        (f"blocks.{{i}}.{a}", f"layers.{{i}}.{b}")
        for a, b in (("norm1.", "norm1."), ("attn.qkv.", "attn.qkv."), ("attn.proj.", "attn.proj."),
                     ("norm2.", "norm2."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))
    )
)
"""EVA ViT-g in LAVIS, after :func:`fuse_lavis_qkv_bias`."""

_HEADS = (("query_tokens", "query_tokens"), ("itm_head.", "itm_head."))

TRANSFORMERS_STAGE1 = (
    TRANSFORMERS_VISION.under("vision_model.", "vision.")
    + RenameTable(
        rules=(("vision_model.post_layernorm.", "ln_vision."), ("qformer.layernorm.", "qformer.embeddings.norm."))
        + _HEADS
        + (("vision_projection.", "vision_proj."), ("text_projection.", "text_proj.")),
        drop_ours=(
            ("qformer.lm_head.", "transformers' retrieval model has no Q-Former LM head"),
            ("temp", "transformers' retrieval model stores no temperature"),
        ),
    )
    + RenameTable(layer_rules("attention")).under("qformer.", "qformer.")
    + RenameTable(TEXT_EMBEDDINGS).under("", "qformer.")
)
"""``Blip2ForImageTextRetrieval``: the Q-Former's text embeddings sit at the top level."""

_LAVIS_STAGE1_WITHOUT_VISION = (
    RenameTable(
        rules=(("ln_vision.", "ln_vision."), ("temp", "temp"), ("vision_proj.", "vision_proj."),
               ("text_proj.", "text_proj."))
        + _HEADS
    )
    + BERT_LM_HEAD.under("Qformer.", "qformer.")
    + BERT_ENCODER.under("Qformer.bert.", "qformer.")
)

LAVIS_STAGE1 = LAVIS_VISION.under("visual_encoder.", "vision.") + _LAVIS_STAGE1_WITHOUT_VISION
"""LAVIS's ``Blip2Qformer``: ``visual_encoder.*``, ``ln_vision``, ``query_tokens``, ``Qformer.*``,
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``."""


def fuse_lavis_qkv_bias(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """EVA's ``attn.q_bias`` + ``attn.v_bias`` -> ``attn.qkv.bias`` = cat(q, 0, v)."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("attn.q_bias")]:
        stem = key[: -len("q_bias")]
        q, v = out.pop(key), out.pop(stem + "v_bias")
        out[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def split_lavis_qkv_bias(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`fuse_lavis_qkv_bias`; refuses a non-zero key bias (LAVIS has none)."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.startswith("visual_encoder.") and k.endswith("attn.qkv.bias")]:
        q, k, v = out.pop(key).chunk(3)
        if k.abs().max() > 0:
            raise ValueError(f"{key}: the key bias is not zero, LAVIS's EVA ViT cannot hold it")
        stem = key[: -len("qkv.bias")]
        out[stem + "q_bias"], out[stem + "v_bias"] = q, v
    return out


TRANSFORMERS_STAGE1_SOURCE = "transformers Blip2ForImageTextRetrieval"
LAVIS_STAGE1_SOURCE = "LAVIS Blip2Qformer"


def fill_fresh_stage1(
    ours: dict[str, Tensor], report: ConversionReport, fresh: Mapping[str, Tensor], source: str, temperature: float
) -> None:
    """The Q-Former LM head and the temperature, where the checkpoint has none, taken from
    ``fresh`` (a newly built model's state dict) into ``ours``; the report says so."""
    absent = sorted(k for k in fresh if k not in ours and (k.startswith("qformer.lm_head.") or k == "temp"))
    for key in absent:
        ours[key] = fresh[key]
        report.dropped[key] = f"not in the {source} checkpoint: initialised fresh"
    if absent:
        logger.warning("%s: %s initialised fresh (temperature %.3g)", source, ", ".join(absent), temperature)


def stage1_config_from_transformers(config: Any) -> Blip2Stage1Config:
    """Our config from a ``Blip2Config`` (object or dict) of a retrieval model."""
    values = config if isinstance(config, Mapping) else config.to_dict()
    vision = values["vision_config"]
    vision_config = VisionConfig(
        **{f: vision[f] for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "image_size", "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias")}
    )
    qformer = qformer_config_from_transformers(values["qformer_config"]).replace(use_lm_head=True)
    if qformer.bos_token_id is None:
        qformer = qformer.replace(bos_token_id=qformer.vocab_size - 1)
    return Blip2Stage1Config(
        vision=vision_config,
        qformer=qformer,
        num_query_tokens=values["num_query_tokens"],
        embed_dim=values["image_text_hidden_size"],
        ln_vision_eps=vision["layer_norm_eps"],
    )


def stage1_state_from_transformers(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ConversionReport]:
    """A ``Blip2ForImageTextRetrieval`` state dict under a stage-1 model's names, and the report.
    That layout has no Q-Former LM head and no temperature (see :func:`fill_fresh_stage1`)."""
    ours, report = TRANSFORMERS_STAGE1.to_ours(state_dict)
    report.raise_if_unmatched(TRANSFORMERS_STAGE1_SOURCE)
    return ours, report


def stage1_to_transformers(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ConversionReport]:
    """A stage-1 model's state dict in ``Blip2ForImageTextRetrieval``'s layout, and the report."""
    theirs, report = TRANSFORMERS_STAGE1.to_theirs(state_dict)
    report.raise_if_unmatched("qformer stage-1")
    return theirs, report


def stage1_state_from_lavis(
    state_dict: Mapping[str, Tensor], config: Blip2Stage1Config
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A LAVIS ``Blip2Qformer`` state dict (the ``model`` entry of its ``.pth``) under a stage-1
    model's names, and the report. Without an image encoder in ``config``, ``visual_encoder.*``
    is dropped."""
    table = LAVIS_STAGE1
    if config.vision is None:
        dropped = (("visual_encoder.", "config.vision is None: images come as features"),)
        table = _LAVIS_STAGE1_WITHOUT_VISION + RenameTable((), dropped)
    check_tied_decoder(state_dict, prefix="Qformer.")
    ours, report = table.to_ours(fuse_lavis_qkv_bias(state_dict))
    report.raise_if_unmatched(LAVIS_STAGE1_SOURCE)
    return ours, report


def stage1_to_lavis(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ConversionReport]:
    """A stage-1 model's state dict in LAVIS's ``Blip2Qformer`` layout, and the report."""
    theirs, report = LAVIS_STAGE1.to_theirs(state_dict)
    report.raise_if_unmatched("qformer stage-1")
    word = theirs["Qformer.bert.embeddings.word_embeddings.weight"]
    theirs["Qformer.cls.predictions.decoder.weight"] = word  # tied in LAVIS's BertLMHeadModel
    theirs["Qformer.cls.predictions.decoder.bias"] = theirs["Qformer.cls.predictions.bias"]
    return split_lavis_qkv_bias(theirs), report
