"""BERT's checkpoints in the Q-Former's terms, as BLIP-2 initialises its Q-Former from
bert-base-uncased: the config's fields and the weights, a state dict in and a state dict out.
:meth:`qformer.pretrained.qformer.QFormer.from_bert` builds the model from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qformer.config import QFormerConfig
from qformer.convert.qformer_layouts import BERT, BERT_FIELDS, check_tied_decoder


def bert_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
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


def qformer_config_from_bert(
    bert_config: dict[str, Any], source: str | Path, keep_token_types: bool = False, **config_overrides: Any
) -> QFormerConfig:
    """The Q-Former config of a BERT ``config.json``: BERT's sizes, a vocabulary one longer for
    BLIP-2's ``[DEC]`` bos token (id = BERT's vocab size), no token types unless
    ``keep_token_types``; ``config_overrides`` set other fields (e.g. ``encoder_hidden_size``)."""
    if bert_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: only absolute position embeddings are supported")
    bert_vocab = int(bert_config["vocab_size"])
    fields: dict[str, Any] = {name: bert_config[name] for name in BERT_FIELDS if name in bert_config}
    fields.update(
        vocab_size=bert_vocab + 1,
        bos_token_id=bert_vocab,
        type_vocab_size=int(bert_config.get("type_vocab_size", 0)) if keep_token_types else 0,
    )
    fields.update(config_overrides)
    return QFormerConfig(**fields)


def qformer_state_from_bert(
    weights: dict[str, Tensor], config: QFormerConfig, source: str | Path, keep_token_types: bool = False
) -> dict[str, Tensor]:
    """BERT's tensors under the Q-Former's names. Self-attention, embeddings, the text FFN (and
    the LM head's transform, when the checkpoint has one) come from BERT; each query FFN is a
    copy of its layer's text FFN; the ``[DEC]`` row of the word embeddings is drawn from
    normal(0, initializer_range) (the torch generator's next draw); BERT's token-type 0 vector is
    folded into the position table (BLIP-2 has no token types) unless ``keep_token_types``.
    Cross-attention and the rest have no BERT source: the caller starts them fresh."""
    weights = bert_names(weights)
    check_tied_decoder(weights)
    loaded, report = BERT.to_ours(weights)
    report.raise_if_unmatched(f"BERT ({source})")
    token_types = loaded.pop("embeddings.token_type.weight", None)
    if keep_token_types:
        if token_types is None:
            raise ValueError(f"{source}: keep_token_types=True but the checkpoint has no token-type table")
        loaded["embeddings.token_type.weight"] = token_types
    elif token_types is not None:
        loaded["embeddings.position.weight"] = loaded["embeddings.position.weight"] + token_types[0]
    word = loaded["embeddings.word.weight"]  # (V, D)
    dec_row = torch.empty(1, word.shape[1], dtype=word.dtype).normal_(std=config.initializer_range)
    loaded["embeddings.word.weight"] = torch.cat([word, dec_row])  # (V + 1, D)
    if "lm_head.bias" in loaded:
        bias = loaded["lm_head.bias"]
        loaded["lm_head.bias"] = torch.cat([bias, bias.new_zeros(1)])
    for key in list(loaded):
        if ".text_ffn." in key:
            loaded[key.replace(".text_ffn.", ".query_ffn.")] = loaded[key].clone()
    return loaded
