"""``qformer.Blip2Stage1``: BLIP-2's first stage as users load it, with its tokenizer and image
preprocessing. Its directories: qformer's layout (what :meth:`Blip2Stage1.save_pretrained` and a
training run's ``final/`` hold: ``config.json``, ``model.safetensors``, the tokenizer's files) and
transformers' ``Blip2ForImageTextRetrieval`` (``Salesforce/blip2-itm-vit-g``: its config,
weights, tokenizer and image processor). And what it computes from inputs as users have them
(image files, PIL images, strings): features, ITM and ITC scores. The architecture is
:class:`~qformer.models.blip2.Blip2Stage1Model`; retrieval over many images is
:mod:`qformer.retrieval`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from qformer.checkpoint import CONFIG_NAME, read_weights, save_model
from qformer.config import Blip2Stage1Config, ImageConfig
from qformer.convert.blip2_layouts import stage1_config_from_transformers
from qformer.data.transforms import eval_image
from qformer.devices import DeviceArg, DeviceMapArg, DtypeArg, dtype_name, parse_dtype
from qformer.loading import auto_dtype, index_checkpoint, load_model, plan_placement, resolve_checkpoint
from qformer.models.blip2 import Blip2Stage1Model
from qformer.pretrained.qformer import QFormer
from qformer.pretrained.transformers import image_config_from_directory, stage1_from_transformers
from qformer.tokenizer import directory_tokenizer, save_tokenizer, tokenize_texts

TEXT_MAX_LENGTH = 32  # LAVIS's Blip2Qformer / Blip2ITM max_txt_len
ImageInput = str | Path | Image.Image | Tensor
Images = ImageInput | Sequence[ImageInput]
Texts = str | Sequence[str]


@dataclass
class Features:
    image: Tensor | None = None  # (Ni, Q, E) normalised, one per query
    text: Tensor | None = None  # (Nt, E) normalised [CLS]
    multimodal: Tensor | None = None  # (N, Q, D) query outputs of the joint pass


@torch.no_grad()
def extract_features(
    model: Blip2Stage1Model,
    image_embeds: Tensor | None = None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Features:
    """Image features from ``image_embeds`` (after ``ln_vision``), text features from tokens,
    and multimodal features (queries that read both) when both are given, pair by pair."""
    features = Features()
    image_kv = None if image_embeds is None else model.qformer.encoder_key_values(image_embeds)
    if image_kv is not None:
        features.image = model.image_features(model.query_pass(image_kv).last_hidden_state)
    if input_ids is not None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features.text = model.text_features(model.text_pass(input_ids, attention_mask).last_hidden_state)
        if image_kv is not None:
            hidden = model.multimodal_pass(input_ids, attention_mask, image_kv).last_hidden_state
            features.multimodal = hidden[:, : model.config.num_query_tokens]
    return features


def image_embeds_of(model: Blip2Stage1Model, images: Images) -> Tensor:
    """Images as users have them -> (N, S, W) after ``ln_vision``. One tensor holds pixels
    (N, 3, H, W) or the image encoder's outputs (N, S, W); otherwise one image or a list of
    paths, PIL images and pixel tensors (3, H, W), paths and PIL images preprocessed as
    ``model.config.image`` says (the preprocessing the model was trained with)."""
    first = next((model.ln_vision if model.vision is None else model.vision).parameters())
    if isinstance(images, Tensor):
        if images.dim() == 3:
            return model.image_embeds(image_features=images.to(first.device))
        pixels = images
    else:
        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        if not items:
            raise ValueError("images: none given")
        tensors = [item if isinstance(item, Tensor) else eval_image(item, model.config.image) for item in items]
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) > 1:
            raise ValueError(f"images: pixel tensors of different shapes {shapes}")
        pixels = torch.stack(tensors)  # (N, 3, H, W)
    size = None if model.config.vision is None else model.config.vision.image_size
    if pixels.dim() != 4 or pixels.shape[1] != 3 or (size is not None and tuple(pixels.shape[2:]) != (size, size)):
        wanted = "(N, 3, H, W)" if size is None else f"(N, 3, {size}, {size})"
        raise ValueError(f"images: pixels must be {wanted} for this model, or encoder outputs (N, S, W); got "
                         f"{tuple(pixels.shape)}")
    return model.image_embeds(pixels.to(first.device))  # the encoder casts; its checks see the pixels as given


def tokenize(model: Blip2Stage1, texts: Texts) -> tuple[Tensor, Tensor]:
    """Texts with the model's tokenizer, right-padded, at most 32 tokens as BLIP-2: input_ids
    and attention_mask (N, T) on the model's device."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: set model.tokenizer (qformer.load_tokenizer) or load a "
                         "directory that has one")
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items or not all(isinstance(text, str) for text in items):
        raise ValueError("texts: a string or a non-empty list of strings")
    tokens = tokenize_texts(model.tokenizer, items, TEXT_MAX_LENGTH, "right")
    device = model.ln_vision.weight.device
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


def check_pairs(what: str, images: int, texts: int) -> None:
    """Pair-by-pair scores need as many images as texts."""
    if images != texts:
        raise ValueError(f"{what} pairs images with texts one by one: got {images} image(s) and {texts} text(s)")


@torch.no_grad()
def features(model: Blip2Stage1, images: Images | None = None, texts: Texts | None = None) -> Features:
    """:func:`extract_features` from images and texts as users have them (see
    :func:`image_embeds_of`, :func:`tokenize`); given both, as many images as texts."""
    if images is None and texts is None:
        raise ValueError("pass images, texts or both")
    embeds = None if images is None else image_embeds_of(model, images)
    input_ids, attention_mask = (None, None) if texts is None else tokenize(model, texts)
    if embeds is not None and input_ids is not None:
        check_pairs("multimodal features", embeds.shape[0], input_ids.shape[0])
    return extract_features(model, embeds, input_ids, attention_mask)


@torch.no_grad()
def itm_scores(model: Blip2Stage1, images: Images, texts: Texts) -> Tensor:
    """The probability that each image matches its text, softmax of the ITM head's logits
    (LAVIS's ``Blip2ITM``, ``match_head="itm"``): (N,)."""
    embeds = image_embeds_of(model, images)
    input_ids, attention_mask = tokenize(model, texts)
    check_pairs("itm_scores", embeds.shape[0], input_ids.shape[0])
    hidden = model.multimodal_pass(input_ids, attention_mask, model.qformer.encoder_key_values(embeds))
    return model.itm_logits(hidden.last_hidden_state).softmax(dim=-1)[:, 1]


@torch.no_grad()
def itc_scores(model: Blip2Stage1, images: Images, texts: Texts) -> Tensor:
    """Every image's ITC similarity with every text, the max over queries (Ni, Nt), as
    transformers' ``Blip2ForImageTextRetrieval`` without the ITM head; LAVIS's ``Blip2ITM``
    (``match_head="itc"``) gives its diagonal."""
    image = extract_features(model, image_embeds_of(model, images)).image
    input_ids, attention_mask = tokenize(model, texts)
    return model.similarity(image, extract_features(model, input_ids=input_ids, attention_mask=attention_mask).text)


RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"
Layout = Literal["qformer", "transformers"]


def stage1_layout_of(values: dict) -> Layout | None:
    """The stage-1 layout a ``config.json``'s values describe, or None for anything else."""
    if values.get("model_type") == "blip-2" and RETRIEVAL_ARCHITECTURE in (values.get("architectures") or []):
        return "transformers"
    if values.get("model_type") is None and "embed_dim" in values:
        return "qformer"
    return None


def stage1_layout(directory: Path) -> Layout:
    """Which stage-1 layout a directory holds; a stage-2 or unknown model fails in one line."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: expected a stage-1 model directory (Blip2Stage1.save_pretrained's, a training "
            f"run's final/, or transformers' {RETRIEVAL_ARCHITECTURE})"
        )
    values = json.loads(file.read_text(encoding="utf-8"))
    model_type, architectures = values.get("model_type"), values.get("architectures") or []
    layout = stage1_layout_of(values)
    if layout is not None:
        return layout
    if model_type in ("blip-2", "instructblip"):
        named = ", ".join(architectures) or f"model_type {model_type!r}"
        raise ValueError(
            f"{directory} holds a stage-2 model ({named}), not stage 1: load it with qformer.Blip2.from_pretrained"
        )
    raise ValueError(
        f"{directory}: config.json (model_type {model_type!r}) is not a stage-1 BLIP-2 model; expected qformer's "
        f"stage-1 layout or transformers' {RETRIEVAL_ARCHITECTURE}"
    )


def keep_fp32(key: str, dtype: torch.dtype) -> bool:
    """In float16 only the frozen image encoder is half precision, as LAVIS runs stage 1."""
    return dtype == torch.float16 and not key.startswith("vision.")


def load_stage1(
    path_or_hub_id: str | Path, dtype: DtypeArg = None, device: DeviceArg = None, device_map: DeviceMapArg = None
) -> Blip2Stage1:
    """Either layout (detected), with the directory's tokenizer, in eval mode (see
    :meth:`Blip2Stage1.from_pretrained`)."""
    directory = resolve_checkpoint(path_or_hub_id)
    if stage1_layout(directory) == "qformer":
        model = load_model(
            Blip2Stage1, Blip2Stage1Config, directory, dtype=dtype, device=device, device_map=device_map,
            keep_fp32=keep_fp32, config_for_dtype=lambda config, name: config.replace(vision_dtype=name),
        )
    else:
        model = load_transformers_stage1(directory, dtype=dtype, device=device, device_map=device_map)
    model.tokenizer = directory_tokenizer(directory)
    return model.eval()


def load_transformers_stage1(
    directory: Path, dtype: DtypeArg = None, device: DeviceArg = None, device_map: DeviceMapArg = None
) -> Blip2Stage1:
    """A ``Blip2ForImageTextRetrieval`` directory, converted strictly; its image processor's
    size, mean and std become ``config.image`` (without one: the encoder's size, CLIP's
    statistics). That layout has no Q-Former LM head and no temperature: they start fresh and
    a log line says so. ``dtype`` None or "auto" keeps the checkpoint's; float16 as LAVIS (the
    image encoder alone); ``device``, or ``device_map`` naming one device."""
    values = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    requested = parse_dtype(dtype)
    main = auto_dtype(values, index_checkpoint(directory)) if requested == "auto" else requested
    config = stage1_config_from_transformers(values)
    image = image_config_from_directory(directory) or ImageConfig(size=config.vision.image_size)
    config = config.replace(vision_dtype=dtype_name(main), image=image.to_dict())
    # the image encoder in vision_dtype
    model, _ = stage1_from_transformers(read_weights(directory), config, Blip2Stage1)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not keep_fp32(name, main):
            param.data = param.data.to(main)
    placement = plan_placement(model, device, device_map, lambda key: main, llm_attr=None)
    return model.to(placement.main)


def save_stage1(model: Blip2Stage1, directory: str | Path) -> None:
    """qformer's layout: ``config.json``, ``model.safetensors`` and the tokenizer (when the
    model has one), every file written atomically."""
    save_model(model, model.config, directory)
    save_tokenizer(model.tokenizer, Path(directory))


class Blip2Stage1(Blip2Stage1Model):
    """BLIP-2's first stage with its tokenizer and image preprocessing: features and ITM / ITC
    scores from image files, PIL images and strings; :meth:`from_pretrained` and
    :meth:`save_pretrained`. The losses are :mod:`qformer.objective`'s, retrieval over many images
    :mod:`qformer.retrieval`'s."""

    qformer_class = QFormer
    tokenizer: PreTrainedTokenizerBase | None = None  # the Q-Former's, for the methods that take text

    def extract_features(self, images: Images | None = None, texts: Texts | None = None) -> Features:
        """Normalised image features (N, Q, E), text features (N, E) and, given both (pair by
        pair), the multimodal query outputs (N, Q, D); see :func:`features`."""
        return features(self, images, texts)

    def itm_scores(self, images: Images, texts: Texts) -> Tensor:
        """The ITM match probability of each (image, text) pair: (N,)."""
        return itm_scores(self, images, texts)

    def itc_scores(self, images: Images, texts: Texts) -> Tensor:
        """The ITC similarity of every image with every text, the max over queries: (Ni, Nt)."""
        return itc_scores(self, images, texts)

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json``, ``model.safetensors`` and the tokenizer, each written atomically."""
        save_stage1(self, directory)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, dtype: Any = None, device: Any = None, device_map: Any = None
    ) -> Blip2Stage1:
        """A directory (or hub id) written by ``save_pretrained`` or a training run's ``final/``,
        or transformers' ``Blip2ForImageTextRetrieval`` (``Salesforce/blip2-itm-vit-g``; its LM
        head and temperature start fresh, logged), with its tokenizer, in eval mode. ``dtype``:
        None or "auto" as stored; ``float16`` as LAVIS runs stage 1 (the frozen image encoder in
        fp16, everything else in fp32); ``bfloat16`` everywhere. ``device``, or ``device_map``
        naming one device."""
        return load_stage1(path_or_hub_id, dtype=dtype, device=device, device_map=device_map)
