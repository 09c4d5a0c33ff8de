"""The image path (and stage 1's text side) as small modules with tensor inputs and outputs, the
shape torch.export traces: each calls the model's own methods, so that the graph computes what
:meth:`Blip2.generate` and :meth:`Blip2Stage1.itc_scores` compute.

The wrappers bypass :meth:`~qformer.models.blip2.Blip2Base.encode_image`'s range check of the
pixels (a data-dependent ``amax``, which no graph can hold) and call the encoder itself; the
shape checks stay in the traced code and hold for every batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qformer.models.blip2 import Blip2Stage1Model, Blip2Stage2Model
from qformer.models.instructblip import InstructBlipStage2Model
from qformer.onnx import IMAGE_FEATURES, IMAGE_PREFIX, TEXT_FEATURES

TRACE_BATCH = 2  # torch.export specialises sizes 0 and 1: the graphs are traced at 2 and take any batch
TRACE_TEXT = 8  # likewise the text length, within the Q-Former's position table
BATCH, TEXT = "batch", "text"


def _image_embeds(model: Blip2Stage1Model | Blip2Stage2Model, pixel_values: Tensor) -> Tensor:
    """(B, 3, S, S) pixels -> (B, P, W) after ``ln_vision``."""
    return model.image_embeds(image_features=model.vision(pixel_values))


class ImagePrefix(nn.Module):
    """Stage 2: pixels -> the projected queries, the LLM's input prefix (B, Q, D_llm)."""

    def __init__(self, model: Blip2Stage2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.language_model_inputs(_image_embeds(self.model, pixel_values))


class InstructImagePrefix(ImagePrefix):
    """InstructBLIP: pixels and the instruction's Q-Former tokens -> the LLM's input prefix."""

    def forward(self, pixel_values: Tensor, qformer_input_ids: Tensor, qformer_attention_mask: Tensor) -> Tensor:
        return self.model.language_model_inputs(_image_embeds(self.model, pixel_values), qformer_input_ids,
                                                qformer_attention_mask)


class ImageFeatures(nn.Module):
    """Stage 1: pixels -> ITC image features (B, Q, E) and the Q-Former's query outputs (B, Q, D)."""

    def __init__(self, model: Blip2Stage1Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        image_kv = self.model.qformer.encoder_key_values(_image_embeds(self.model, pixel_values))
        hidden = self.model.query_pass(image_kv).last_hidden_state  # (B, Q, D)
        return self.model.image_features(hidden), hidden


class TextFeatures(nn.Module):
    """Stage 1: token ids and mask (B, T) -> the ITC text feature (B, E)."""

    def __init__(self, model: Blip2Stage1Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.text_features(self.model.text_pass(input_ids, attention_mask).last_hidden_state)


@dataclass
class Graph:
    """One graph to export: its module, example inputs by name (in ``forward``'s order), output
    names, and the dynamic axes of each input (axis -> name)."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


def _pixels(model: nn.Module) -> Tensor:
    size = model.config.image.size
    return torch.zeros(TRACE_BATCH, 3, size, size)  # fp32 always: the encoder casts to its own dtype


def _tokens(ids: str, mask: str) -> dict[str, Tensor]:
    return {ids: torch.ones(TRACE_BATCH, TRACE_TEXT, dtype=torch.long),
            mask: torch.ones(TRACE_BATCH, TRACE_TEXT, dtype=torch.long)}


def graphs_for(model: nn.Module) -> list[Graph]:
    """The graphs of a model's kind: stage 2's ``image_prefix`` (InstructBLIP's with the
    instruction), or stage 1's ``image_features`` and ``text_features``."""
    image_axes = {0: BATCH}
    token_axes = {0: BATCH, 1: TEXT}
    if isinstance(model, InstructBlipStage2Model):
        inputs = {"pixel_values": _pixels(model), **_tokens("qformer_input_ids", "qformer_attention_mask")}
        return [Graph(IMAGE_PREFIX, InstructImagePrefix(model), inputs, ("language_model_inputs",),
                      {"pixel_values": image_axes, "qformer_input_ids": token_axes,
                       "qformer_attention_mask": token_axes})]
    if isinstance(model, Blip2Stage2Model):
        return [Graph(IMAGE_PREFIX, ImagePrefix(model), {"pixel_values": _pixels(model)}, ("language_model_inputs",),
                      {"pixel_values": image_axes})]
    if isinstance(model, Blip2Stage1Model):
        return [
            Graph(IMAGE_FEATURES, ImageFeatures(model), {"pixel_values": _pixels(model)},
                  ("image_features", "query_output"), {"pixel_values": image_axes}),
            Graph(TEXT_FEATURES, TextFeatures(model), _tokens("input_ids", "attention_mask"), ("text_features",),
                  {"input_ids": token_axes, "attention_mask": token_axes}),
        ]
    raise ValueError(f"cannot export a {type(model).__name__}: expected a stage-1 model, a BLIP-2 or an InstructBLIP")
