"""BLIP-2 models: the stage-1 model (frozen image encoder, queries, Q-Former and its heads)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import Blip2Stage1Config
from qformer.models.qformer import KeyValue, QFormer, QFormerOutput
from qformer.models.vision import EvaViT

ImageKeyValues = tuple[KeyValue | None, ...]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def freeze(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """No gradients, eval mode, optionally cast (e.g. fp16 for a frozen ViT)."""
    module.requires_grad_(False)
    module.eval()
    if dtype is not None:
        module.to(dtype)
    return module


def expand_key_values(key_values: ImageKeyValues, index: Tensor) -> ImageKeyValues:
    """Rows ``index`` of per-layer image keys/values: reuse one image's K/V for many texts."""
    return tuple(None if kv is None else (kv[0][index], kv[1][index]) for kv in key_values)


def concat_key_values(*parts: ImageKeyValues) -> ImageKeyValues:
    """Stack per-layer keys/values of several image batches along the batch."""
    return tuple(
        None if layer[0] is None else (torch.cat([kv[0] for kv in layer]), torch.cat([kv[1] for kv in layer]))
        for layer in zip(*parts)
    )


class Blip2Stage1(nn.Module):
    """BLIP-2's first stage (``Blip2Qformer`` in LAVIS, ``Blip2ForImageTextRetrieval`` in
    transformers). Computes features; the losses are in :mod:`qformer.stage1`.

    ``vision`` replaces the EVA ViT with another frozen tower (e.g.
    :class:`~qformer.models.vision.TransformersVisionTower`); with ``config.vision = None`` and
    no tower, images come as precomputed encoder outputs.
    """

    def __init__(self, config: Blip2Stage1Config, vision: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.qformer.hidden_size
        if vision is None and config.vision is not None:
            vision = EvaViT(config.vision)
        width = getattr(vision, "width", config.qformer.encoder_hidden_size)
        if width != config.qformer.encoder_hidden_size:
            raise ValueError(
                f"the image encoder is {width} wide but the Q-Former cross-attends to "
                f"encoder_hidden_size={config.qformer.encoder_hidden_size}"
            )
        self.vision = None if vision is None else freeze(vision, _DTYPES[config.vision_dtype])
        self.ln_vision = nn.LayerNorm(config.qformer.encoder_hidden_size, eps=config.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, hidden) * 0.02)
        self.qformer = QFormer(config.qformer)
        self.vision_proj = nn.Linear(hidden, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(config.temperature))
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=config.qformer.initializer_range)
            nn.init.zeros_(head.bias)

    def train(self, mode: bool = True) -> Blip2Stage1:
        """The frozen image encoder stays in eval mode."""
        super().train(mode)
        if self.vision is not None:
            self.vision.eval()
        return self

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Frozen encoder output (B, S, W), before ``ln_vision``: the features to precompute."""
        if self.vision is None:
            raise ValueError("this model has no image encoder (config.vision is None): pass image features")
        return self.vision(pixel_values)

    def image_embeds(self, pixel_values: Tensor | None = None, image_features: Tensor | None = None) -> Tensor:
        """``ln_vision`` over encoder outputs (B, S, W); pixels or precomputed features."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        features = self.encode_image(pixel_values) if image_features is None else image_features
        return self.ln_vision(features.to(self.ln_vision.weight.dtype))

    def temperature(self) -> Tensor:
        return self.temp.clamp(self.config.min_temperature, self.config.max_temperature)

    def queries(self, batch: int) -> Tensor:
        return self.query_tokens.expand(batch, -1, -1)  # (B, Q, D)

    def query_pass(self, image_key_values: ImageKeyValues, use_cache: bool = False) -> QFormerOutput:
        """Queries alone, cross-attending to the image (ITC image side, captioning prefix)."""
        batch = next(kv for kv in image_key_values if kv is not None)[0].shape[0]
        return self.qformer(query_embeds=self.queries(batch), encoder_key_values=image_key_values, use_cache=use_cache)

    def image_features(self, query_hidden: Tensor) -> Tensor:
        """(B, Q, D) query outputs -> (B, Q, E) L2-normalised image features."""
        return F.normalize(self.vision_proj(query_hidden), dim=-1)

    def text_pass(self, input_ids: Tensor, attention_mask: Tensor) -> QFormerOutput:
        """Text alone (ITC text side)."""
        return self.qformer(input_ids=input_ids, attention_mask=attention_mask)

    def text_features(self, text_hidden: Tensor) -> Tensor:
        """(B, T, D) text outputs -> (B, E) L2-normalised [CLS] features."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def multimodal_pass(
        self, input_ids: Tensor, attention_mask: Tensor, image_key_values: ImageKeyValues
    ) -> QFormerOutput:
        """[queries; text] in one bidirectional pass, queries reading the image (ITM)."""
        batch = input_ids.shape[0]
        query_mask = attention_mask.new_ones(batch, self.config.num_query_tokens)
        return self.qformer(
            input_ids=input_ids,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            query_embeds=self.queries(batch),
            encoder_key_values=image_key_values,
        )

    def itm_logits(self, multimodal_hidden: Tensor) -> Tensor:
        """ITM head averaged over the query positions: (B, Q + T, D) -> (B, 2)."""
        return self.itm_head(multimodal_hidden[:, : self.config.num_query_tokens]).mean(dim=1)

    @staticmethod
    def similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Image-text similarity, the max over queries: (Ni, Q, E) x (Nt, E) -> (Ni, Nt)."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors``, each written atomically."""
        from qformer.checkpoint import save_model

        save_model(self, self.config, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Blip2Stage1:
        from qformer.checkpoint import load_model

        return load_model(cls, Blip2Stage1Config, directory)
