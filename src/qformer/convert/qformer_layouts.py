"""Q-Former key layouts: BERT / LAVIS (``Qformer.bert.*``, ``Qformer.cls.*``), transformers'
``Blip2QFormerModel`` and ``InstructBlipQFormerModel``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from qformer.config import QFormerConfig
from qformer.convert.rename import ConversionReport, RenameTable

TransformersLayout = Literal["blip2", "instructblip"]


def layer_rules(attention: str) -> tuple[tuple[str, str], ...]:
    """Per-layer renames; ``attention`` is ``self`` in BERT/LAVIS and ``attention`` in transformers."""
    rules = []
    for theirs, ours in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        for proj in ("query", "key", "value"):
            rules.append((f"encoder.layer.{{i}}.{theirs}.{attention}.{proj}.", f"layers.{{i}}.{ours}.{proj}."))
        rules.append((f"encoder.layer.{{i}}.{theirs}.output.dense.", f"layers.{{i}}.{ours}.out."))
        rules.append((f"encoder.layer.{{i}}.{theirs}.output.LayerNorm.", f"layers.{{i}}.{ours}.norm."))
    for suffix, ours in (("_query", "query_ffn"), ("", "text_ffn")):
        rules.append((f"encoder.layer.{{i}}.intermediate{suffix}.dense.", f"layers.{{i}}.{ours}.fc1."))
        rules.append((f"encoder.layer.{{i}}.output{suffix}.dense.", f"layers.{{i}}.{ours}.fc2."))
        rules.append((f"encoder.layer.{{i}}.output{suffix}.LayerNorm.", f"layers.{{i}}.{ours}.norm."))
    return tuple(rules)


TEXT_EMBEDDINGS = (
    ("embeddings.word_embeddings.", "embeddings.word."),
    ("embeddings.position_embeddings.", "embeddings.position."),
)

BERT_ENCODER = RenameTable(
    rules=TEXT_EMBEDDINGS
    + (
        ("embeddings.token_type_embeddings.", "embeddings.token_type."),
        ("embeddings.LayerNorm.", "embeddings.norm."),
    )
    + layer_rules("self"),
    drop=(
        ("embeddings.position_ids", "a buffer of position indices, rebuilt at run time"),
        ("pooler.", "BLIP-2's Q-Former has no pooler"),
    ),
)
"""``BertModel`` (LAVIS: ``Qformer.bert.*``)."""

BERT_LM_HEAD = RenameTable(
    rules=(
        ("cls.predictions.transform.dense.", "lm_head.dense."),
        ("cls.predictions.transform.LayerNorm.", "lm_head.norm."),
        ("cls.predictions.bias", "lm_head.bias"),
    ),
    drop=(
        ("cls.predictions.decoder.weight", "tied to the word embeddings"),
        ("cls.predictions.decoder.bias", "the same tensor as cls.predictions.bias"),
        ("cls.seq_relationship.", "BERT's next-sentence head is not used"),
    ),
)
"""BERT's ``cls.predictions`` head (LAVIS: ``Qformer.cls.*``)."""

BERT = BERT_ENCODER + BERT_LM_HEAD


def check_tied_decoder(state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
    """BLIP-2 ties the LM decoder to the word embeddings; a checkpoint that does not cannot be
    held without losing its decoder, so it is refused."""
    decoder = state_dict.get(f"{prefix}cls.predictions.decoder.weight")
    word = state_dict.get(f"{prefix}bert.embeddings.word_embeddings.weight")
    if word is None:
        word = state_dict.get(f"{prefix}embeddings.word_embeddings.weight")
    if decoder is not None and word is not None and not torch.equal(decoder, word):
        raise ValueError(f"{prefix}cls.predictions.decoder.weight is not tied to the word embeddings")


_NO_LM_HEAD = (("lm_head.", "transformers' Q-Former has no LM head"),)

TRANSFORMERS_BLIP2_QFORMER = RenameTable(
    rules=(("layernorm.", "embeddings.norm."),) + TEXT_EMBEDDINGS + layer_rules("attention"),
    drop_ours=_NO_LM_HEAD,
)
"""``Blip2QFormerModel`` keys; the text embeddings of ``Blip2ForImageTextRetrieval`` (its
top-level ``embeddings.*``) under ``embeddings.``."""

TRANSFORMERS_INSTRUCTBLIP_QFORMER = RenameTable(
    rules=(("embeddings.layernorm.", "embeddings.norm."),) + TEXT_EMBEDDINGS + layer_rules("attention"),
    drop_ours=_NO_LM_HEAD,
)

_TABLES: dict[str, RenameTable] = {"blip2": TRANSFORMERS_BLIP2_QFORMER, "instructblip": TRANSFORMERS_INSTRUCTBLIP_QFORMER}

BERT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "layer_norm_eps",
    "initializer_range",
    "pad_token_id",
)
"""Config fields that BERT, transformers' Q-Formers and ours name alike."""

_SHARED_FIELDS = BERT_FIELDS + ("vocab_size", "cross_attention_frequency", "encoder_hidden_size")


def qformer_config_from_transformers(config: Any, layout: TransformersLayout = "blip2") -> QFormerConfig:
    """Our config from a ``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig`` (object or dict)."""
    values = config if isinstance(config, Mapping) else config.to_dict()
    fields = {name: values[name] for name in _SHARED_FIELDS}
    use_text = bool(values.get("use_qformer_text_input", False)) if layout == "blip2" else True
    bos = QFormerConfig.bos_token_id if fields["vocab_size"] > QFormerConfig.bos_token_id else None
    return QFormerConfig(**fields, use_text_input=use_text, use_lm_head=False, bos_token_id=bos)


def _table(layout: str) -> RenameTable:
    if layout not in _TABLES:
        raise ValueError(f"unknown transformers layout {layout!r}; expected one of {sorted(_TABLES)}")
    return _TABLES[layout]


def qformer_state_from_transformers(
    state_dict: Mapping[str, Tensor], layout: TransformersLayout = "blip2"
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A transformers Q-Former's weights under our names, and the report. Fails naming every key
    that is unknown or missing."""
    ours, report = _table(layout).to_ours(state_dict)
    report.raise_if_unmatched(f"transformers {layout} Q-Former")
    return ours, report


def qformer_to_transformers(
    state_dict: Mapping[str, Tensor], layout: TransformersLayout = "blip2"
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Our Q-Former's weights (its state dict) in a transformers layout, and what had no place there."""
    theirs, report = _table(layout).to_theirs(state_dict)
    report.raise_if_unmatched("qformer")
    return theirs, report
