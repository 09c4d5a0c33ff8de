"""``qformer.QFormer``: the Q-Former as users load it, from BERT (BLIP-2's initialisation) or
from a directory it was saved to. The architecture is :class:`~qformer.models.qformer.QFormerModel`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qformer.checkpoint import load_state_dict_strict, read_weights, save_model
from qformer.config import QFormerConfig
from qformer.convert.bert import qformer_config_from_bert, qformer_state_from_bert
from qformer.convert.qformer_layouts import (
    TransformersLayout,
    qformer_config_from_transformers,
    qformer_state_from_transformers,
)
from qformer.loading import load_model
from qformer.models.qformer import QFormerModel

logger = logging.getLogger(__name__)


class QFormer(QFormerModel):
    """The Q-Former with BLIP-2's ways in and out: :meth:`from_bert`, :meth:`from_pretrained`,
    :meth:`save_pretrained`. The Q-Former inside a loaded ``Blip2Stage1`` or ``Blip2`` is one."""

    @classmethod
    def from_bert(cls, path: str | Path, keep_token_types: bool = False, **config_overrides: Any) -> QFormer:
        """A Q-Former initialised from a transformers-layout BERT directory (``config.json`` +
        weights) as BLIP-2 does from bert-base-uncased: self-attention, embeddings, text FFN
        (and the LM head's transform, when the checkpoint has one) from BERT; each query FFN a
        copy of its layer's text FFN; cross-attention fresh; the vocabulary one longer for
        ``[DEC]``. See :func:`qformer.convert.bert.qformer_state_from_bert` for the details and
        ``config_overrides`` (e.g. ``encoder_hidden_size``)."""
        path = Path(path)
        bert_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = qformer_config_from_bert(bert_config, path, keep_token_types, **config_overrides)
        weights = read_weights(path)
        model = cls(config)  # before the [DEC] row's draw: one seed gives the same weights as it always did
        fresh = model.state_dict()
        loaded = qformer_state_from_bert(weights, config, path, keep_token_types)
        initialised = sorted(k for k in fresh if k not in loaded)
        if config.use_lm_head and not any(k.startswith("lm_head.") for k in loaded):
            logger.info("%s has no LM head (cls.predictions): the Q-Former's LM head starts random", path)
        logger.info("from %s: %d tensors from BERT, %d initialised fresh", path, len(loaded), len(initialised))
        unused = sorted(k for k in loaded if k not in fresh)
        if unused:
            raise ValueError(f"{path}: BERT tensors with no place in the Q-Former config {config}: {unused}")
        load_state_dict_strict(model, {**fresh, **loaded})
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors``, each written atomically."""
        save_model(self, self.config, directory)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, dtype: Any = None, device: Any = None, device_map: Any = None
    ) -> QFormer:
        """A directory written by ``save_pretrained`` (or a hub id), in ``dtype`` (None or "auto":
        as stored) on ``device``."""
        return load_model(cls, QFormerConfig, path_or_hub_id, dtype=dtype, device=device, device_map=device_map)


def qformer_from_transformers(
    state_dict: Mapping[str, Tensor], config: QFormerConfig, layout: TransformersLayout = "blip2"
) -> QFormer:
    """A :class:`QFormer` holding a transformers Q-Former's weights. Fails naming every key that
    is unknown, missing or mis-shaped."""
    ours, _ = qformer_state_from_transformers(state_dict, layout)
    model = QFormer(config)
    load_state_dict_strict(model, ours)
    return model


def load_transformers_qformer(
    qformer: nn.Module, text_embeddings: nn.Module | None = None, layout: TransformersLayout = "blip2"
) -> QFormer:
    """Convert a live transformers Q-Former module (and, for BLIP-2's retrieval model, its
    separate ``embeddings`` module) into ours."""
    state_dict = dict(qformer.state_dict())
    if text_embeddings is not None:
        state_dict.update({f"embeddings.{k}": v for k, v in text_embeddings.state_dict().items()})
    config = qformer_config_from_transformers(qformer.config, layout)
    return qformer_from_transformers(state_dict, config, layout)
