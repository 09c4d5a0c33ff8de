"""Checks of what users pass to the models' public methods, each failing in one line that names
the argument, what it should be and what it is.

They read shapes and dtypes only (no host sync), except :func:`check_pixels`' range check: one
``amax`` over the pixels, which callers skip while training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

# normalised pixels (CLIP's mean and std) lie within about [-1.8, 2.2]; raw 0-255 pixels go far beyond
RAW_PIXELS = 20.0
NORMALISE = "normalise them with qformer.data.transforms.eval_transform (the model's preprocessing)"


def one_line(value: object) -> str:
    """``str(value)`` (a text, an exception) with every run of whitespace, line breaks included,
    made one space: what a message to a user, a client or a metric's tokenizer holds."""
    return " ".join(str(value).split())


def check_pixels(pixel_values: Tensor, image_size: int | None, check_range: bool = True,
                 name: str = "pixel_values") -> None:
    """Normalised float pixels (B, 3, S, S), S the encoder's ``image_size`` (None: any H, W).
    ``check_range`` also refuses values beyond :data:`RAW_PIXELS` (0-255 pixels), at the cost
    of one ``amax``."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"{name} must be a tensor (B, 3, H, W), got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name} are {pixel_values.dtype}, not normalised floats: {NORMALISE}")
    side = "H, W" if image_size is None else f"{image_size}, {image_size}"
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[1] != 3 or (image_size is not None and shape[2:] != (image_size, image_size)):
        raise ValueError(f"{name} must be (B, 3, {side}) for this model, got {shape}")
    if check_range and pixel_values.numel():
        top = float(pixel_values.detach().abs().amax())
        if top > RAW_PIXELS:
            raise ValueError(f"{name} reach {top:g}, beyond normalised pixels (|x| <= {RAW_PIXELS:g}): they look "
                             f"like raw 0-255 pixels; {NORMALISE}")


def check_features(image_features: Tensor, width: int) -> None:
    """Precomputed image encoder outputs (B, S, width)."""
    shape = tuple(image_features.shape)
    if len(shape) != 3 or shape[2] != width:
        raise ValueError(f"image_features must be the image encoder's outputs (B, S, {width}), got {shape}")


def check_tokens(input_ids: Tensor | None, attention_mask: Tensor | None,
                 names: tuple[str, str] = ("input_ids", "attention_mask")) -> None:
    """Token ids (B, T) and a mask of the same shape (or none): a mask is never broadcast."""
    if input_ids is None:
        if attention_mask is not None:
            raise ValueError(f"{names[1]} given without {names[0]}")
        return
    if input_ids.dim() != 2:
        raise ValueError(f"{names[0]} must be (B, T), got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"{names[1]} must have {names[0]}'s shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}: one mask row per text (masks are not broadcast)")


def check_positions(name: str, length: int, table: int | None, where: str, fix: str = "truncate the text") -> None:
    """``length`` positions fit the position table of ``table`` rows (None: no table)."""
    if table is not None and length > table:
        raise ValueError(f"{name} need {length} positions but {where} has {table}: {fix}")


def check_batch(**tensors: Tensor | None) -> None:
    """One batch size (the first dimension) for every tensor given. Compared pairwise, not in a
    set: under torch.export a dynamic batch is a SymInt, which cannot be hashed."""
    sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None and t.dim() > 0}
    first = next(iter(sizes.values()), None)
    if any(size != first for size in sizes.values()):
        given = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"batch sizes differ ({given}): pass one row per example")


def check_qformer_inputs(
    max_positions: int,
    input_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    attention_mask: Tensor | None,
    query_embeds: Tensor | None,
    past_key_values: Any,
    first_position: int | None,
) -> None:
    """What :class:`~qformer.models.qformer.QFormer` takes: one batch for text, queries, mask
    and cache; the text within the position table from ``first_position`` (None: the caller
    gives its own position_ids)."""
    past = None if past_key_values is None else past_key_values[0][0]
    check_batch(input_ids=input_ids, inputs_embeds=inputs_embeds, query_embeds=query_embeds,
                attention_mask=attention_mask, past_key_values=past)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, P + Q + T), got {tuple(attention_mask.shape)}")
    text = input_ids if input_ids is not None else inputs_embeds
    if text is not None and first_position is not None:
        check_positions(f"{text.shape[1]} text tokens from position {first_position}", first_position + text.shape[1],
                        max_positions, "the Q-Former's position table (max_position_embeddings)")


def check_images(images: Any, name: str = "images") -> None:
    """A non-empty list of images (paths or PIL images), not one image alone."""
    if isinstance(images, (str, Path)) or hasattr(images, "getpixel") or not isinstance(images, Sequence):
        raise TypeError(f"{name} must be a list of images (paths or PIL images), got {type(images).__name__}")
    if not images:
        raise ValueError(f"{name}: none given; pass a list of at least one image")


def llm_positions(language_model: Any) -> int | None:
    """The LLM's position table (OPT's 2048), or None where it has none (T5's relative positions)."""
    if language_model.config.is_encoder_decoder:
        return None
    return getattr(language_model.config, "max_position_embeddings", None)


def check_generation(generation_kwargs: dict) -> None:
    """``num_beams`` and ``max_new_tokens``, where given, at least 1 (transformers divides by the
    beams and fails without naming them)."""
    for key in ("num_beams", "max_new_tokens"):
        value = generation_kwargs.get(key)
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")


def check_stage2_inputs(
    model: nn.Module,
    pixel_values: Tensor | None,
    image_features: Tensor | None,
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    qformer_input_ids: Tensor | None,
    qformer_attention_mask: Tensor | None,
    labels: Tensor | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """What :class:`~qformer.models.blip2.Blip2Stage2Model`'s forward and generate take (``model``, whose
    ``num_query_tokens``, ``language_model`` and ``qformer`` bound the lengths): one batch;
    texts with their masks; the queries, text and new tokens within the LLM's position table
    (one position to spare after a prompt: the last new token is never fed back), the
    instruction within the Q-Former's."""
    check_batch(pixel_values=pixel_values, image_features=image_features, input_ids=input_ids,
                attention_mask=attention_mask, labels=labels, qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask)
    check_tokens(input_ids, attention_mask)
    check_tokens(qformer_input_ids, qformer_attention_mask, ("qformer_input_ids", "qformer_attention_mask"))
    text = 0 if input_ids is None else input_ids.shape[1]
    new = f" + max_new_tokens {max_new_tokens}" if max_new_tokens else ""
    check_positions(f"{model.num_query_tokens} queries + {text} input_ids{new}",
                    model.num_query_tokens + text + (max_new_tokens or 0), llm_positions(model.language_model),
                    "the LLM's position table (max_position_embeddings)", "shorten the text or generate fewer tokens")
    if qformer_input_ids is not None:
        check_positions(f"{qformer_input_ids.shape[1]} qformer_input_ids", qformer_input_ids.shape[1],
                        model.qformer.config.max_position_embeddings,
                        "the Q-Former's position table (max_position_embeddings)")
