"""Initialise a Q-Former from a BERT checkpoint, as BLIP-2 does from bert-base-uncased."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qformer.checkpoint import load_state_dict_strict, read_weights
from qformer.config import QFormerConfig
from qformer.convert.qformer_layouts import BERT, BERT_FIELDS, check_tied_decoder
from qformer.models.qformer import QFormer

logger = logging.getLogger(__name__)

def _bert_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """BertModel names whatever head the checkpoint was saved with: drop the ``bert.``
    prefix and rename the old LayerNorm ``gamma``/``beta``."""
    out = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("bert.")
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = tensor
    return out


def qformer_from_bert(path: str | Path, keep_token_types: bool = False, **config_overrides: Any) -> QFormer:
    """Build a Q-Former from a transformers-layout BERT directory (``config.json`` + weights).

    Self-attention, embeddings, text FFN (and the LM head's transform, when the checkpoint has
    one) come from BERT; each query FFN is a copy of its layer's text FFN; cross-attention is
    freshly initialised; the vocabulary gains BLIP-2's ``[DEC]`` bos token (id = BERT's vocab
    size), initialised normal(0, initializer_range). BERT's token-type 0 vector is folded into
    the position table (BLIP-2 has no token types) unless ``keep_token_types``, which keeps
    BERT's token-type table. ``config_overrides`` set other fields (e.g. ``encoder_hidden_size``).
    """
    path = Path(path)
    bert_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if bert_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported")
    bert_vocab = int(bert_config["vocab_size"])
    fields: dict[str, Any] = {name: bert_config[name] for name in BERT_FIELDS if name in bert_config}
    fields.update(
        vocab_size=bert_vocab + 1,
        bos_token_id=bert_vocab,
        type_vocab_size=int(bert_config.get("type_vocab_size", 0)) if keep_token_types else 0,
    )
    fields.update(config_overrides)
    config = QFormerConfig(**fields)

    weights = _bert_names(read_weights(path))
    check_tied_decoder(weights)
    loaded, report = BERT.to_ours(weights)
    report.raise_if_unmatched(f"BERT ({path})")
    token_types = loaded.pop("embeddings.token_type.weight", None)
    if keep_token_types:
        if token_types is None:
            raise ValueError(f"{path}: keep_token_types=True but the checkpoint has no token-type table")
        loaded["embeddings.token_type.weight"] = token_types
    elif token_types is not None:
        loaded["embeddings.position.weight"] = loaded["embeddings.position.weight"] + token_types[0]

    model = QFormer(config)
    fresh = model.state_dict()
    word = loaded["embeddings.word.weight"]  # (V, D)
    dec_row = torch.empty(1, word.shape[1], dtype=word.dtype).normal_(std=config.initializer_range)
    loaded["embeddings.word.weight"] = torch.cat([word, dec_row])  # (V + 1, D)
    if "lm_head.bias" in loaded:
        bias = loaded["lm_head.bias"]
        loaded["lm_head.bias"] = torch.cat([bias, bias.new_zeros(1)])
    for key in list(loaded):
        if ".text_ffn." in key:
            loaded[key.replace(".text_ffn.", ".query_ffn.")] = loaded[key].clone()

    initialised = sorted(k for k in fresh if k not in loaded)
    if config.use_lm_head and not any(k.startswith("lm_head.") for k in loaded):
        logger.info("%s has no LM head (cls.predictions): the Q-Former's LM head starts random", path)
    logger.info("from %s: %d tensors from BERT, %d initialised fresh", path, len(loaded), len(initialised))
    unused = sorted(k for k in loaded if k not in fresh)
    if unused:
        raise ValueError(f"{path}: BERT tensors with no place in the Q-Former config {config}: {unused}")
    load_state_dict_strict(model, {**fresh, **loaded})
    return model
