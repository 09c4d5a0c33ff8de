"""BLIP-2 models: the shared image side, the stage-1 model and the stage-2 model (the bridge to a
frozen LLM)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedModel,
)

from qformer.checks import check_features, check_generation, check_pixels, check_stage2_inputs
from qformer.config import Blip2Config, Blip2Stage1Config, QFormerConfig, VisionConfig
from qformer.devices import DTYPES
from qformer.models.qformer import BlockKeyValue, KeyValue, QFormerModel, QFormerOutput
from qformer.models.vision import EvaViT

ImageKeyValues = tuple[KeyValue | BlockKeyValue | None, ...]



def cache_argument(model: nn.Module) -> str:
    """The name transformers' forward, its outputs and generate use for a cache: ``cache`` in
    recent releases, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _foldable_rows(head: nn.Module, args: tuple) -> tuple | None:
    """The frozen LLM head's input, (..., D), in a layout torch's matmul folds into one
    (N, D) x (D, V) product. transformers hands it the last position as ``hidden[:, -1:]``,
    whose strides torch does not fold when the weight needs no gradient: it then copies the
    (V, D) weight for every row (0.6 s per prefill for OPT-2.7B on a CPU)."""
    hidden = args[0]
    sizes, strides = hidden.shape, hidden.stride()
    if all(strides[i] == strides[i + 1] * sizes[i + 1] for i in range(hidden.dim() - 2)):
        return None
    return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])


def freeze(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """No gradients, eval mode, optionally its parameters cast (e.g. fp16 for a frozen ViT);
    buffers computed at build (rotary tables) keep their dtype, as transformers loads them."""
    module.requires_grad_(False)
    module.eval()
    if dtype is not None:
        for param in module.parameters():
            if param.is_floating_point():  # quantised weights (int8, packed 4-bit) stay as they are
                param.data = param.data.to(dtype)
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


class Blip2Base(nn.Module):
    """What every BLIP-2 model shares: the frozen image encoder, ``ln_vision``, the learned
    queries and the Q-Former's query pass over the image. ``qformer_class`` builds the Q-Former:
    the classes users load (:mod:`qformer.pretrained`) give theirs the Q-Former's own loading and
    saving."""

    qformer_class: type[QFormerModel] = QFormerModel

    def __init__(
        self,
        vision_config: VisionConfig | None,
        qformer_config: QFormerConfig,
        num_query_tokens: int,
        ln_vision_eps: float,
        vision_dtype: str,
        vision: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if vision is None and vision_config is not None:
            vision = EvaViT(vision_config)
        width = getattr(vision, "width", qformer_config.encoder_hidden_size)
        if width != qformer_config.encoder_hidden_size:
            raise ValueError(
                f"the image encoder is {width} wide but the Q-Former cross-attends to "
                f"encoder_hidden_size={qformer_config.encoder_hidden_size}"
            )
        self.num_query_tokens = num_query_tokens
        self.vision = None if vision is None else freeze(vision, DTYPES[vision_dtype])
        self.ln_vision = nn.LayerNorm(qformer_config.encoder_hidden_size, eps=ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, qformer_config.hidden_size) * 0.02)
        self.qformer = self.qformer_class(qformer_config)

    def resize_image_encoder(self, image_size: int) -> None:
        """The EVA image encoder at ``image_size`` px, and the config saved with the model (the
        encoder's size and the preprocessing's)."""
        if not isinstance(self.vision, EvaViT):
            raise ValueError(f"only the EVA image encoder can be resized to {image_size} px; this model has "
                             f"{type(self.vision).__name__}")
        self.vision.resize(image_size)
        self.config = self.config.replace(vision=self.vision.config.to_dict(),
                                          image=self.config.image.replace(size=image_size).to_dict())

    @property
    def vision_trains(self) -> bool:
        """Whether the image encoder has trainable weights (BLIP-2's COCO fine-tuning)."""
        return self.vision is not None and any(p.requires_grad for p in self.vision.parameters())

    def train(self, mode: bool = True) -> Blip2Base:
        """A frozen image encoder stays in eval mode."""
        super().train(mode)
        if self.vision is not None and not self.vision_trains:
            self.vision.eval()
        return self

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Encoder output (B, S, W), before ``ln_vision``: the features to precompute. No
        autograd graph unless the encoder trains."""
        if self.vision is None:
            raise ValueError("this model has no image encoder (config.vision is None): pass image features")
        check_pixels(pixel_values, getattr(self.vision, "image_size", None), check_range=not self.training)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trains):
            return self.vision(pixel_values)

    def image_embeds(self, pixel_values: Tensor | None = None, image_features: Tensor | None = None) -> Tensor:
        """``ln_vision`` over encoder outputs (B, S, W); pixels or precomputed features."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        if image_features is not None:
            check_features(image_features, self.ln_vision.normalized_shape[0])
        features = self.encode_image(pixel_values) if image_features is None else image_features
        return self.ln_vision(features.to(self.ln_vision.weight.dtype))

    def queries(self, batch: int) -> Tensor:
        return self.query_tokens.expand(batch, -1, -1)  # (B, Q, D)

    def query_pass(self, image_key_values: ImageKeyValues, use_cache: bool = False) -> QFormerOutput:
        """Queries alone, cross-attending to the image (ITC image side, the LLM's prefix)."""
        batch = next(kv for kv in image_key_values if kv is not None)[0].shape[0]
        return self.qformer(query_embeds=self.queries(batch), encoder_key_values=image_key_values, use_cache=use_cache)

    def multimodal_pass(
        self, input_ids: Tensor, attention_mask: Tensor, image_key_values: ImageKeyValues
    ) -> QFormerOutput:
        """[queries; text] in one bidirectional pass, queries reading the image (ITM; InstructBLIP)."""
        batch = input_ids.shape[0]
        query_mask = attention_mask.new_ones(batch, self.num_query_tokens)
        return self.qformer(
            input_ids=input_ids,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            query_embeds=self.queries(batch),
            encoder_key_values=image_key_values,
        )


class Blip2Stage1Model(Blip2Base):
    """BLIP-2's first stage (``Blip2Qformer`` in LAVIS, ``Blip2ForImageTextRetrieval`` in
    transformers): the architecture, which computes features; the losses are in
    :mod:`qformer.objective`, and :class:`qformer.Blip2Stage1` adds the tokenizer, preprocessing,
    scores from user inputs, loading and saving.

    ``vision`` replaces the EVA ViT with another frozen tower (e.g.
    :class:`~qformer.models.vision.TransformersVisionTower`); with ``config.vision = None`` and
    no tower, images come as precomputed encoder outputs.
    """

    def __init__(self, config: Blip2Stage1Config, vision: nn.Module | None = None) -> None:
        super().__init__(
            config.vision, config.qformer, config.num_query_tokens, config.ln_vision_eps, config.vision_dtype, vision
        )
        self.config = config
        hidden = config.qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(config.temperature))
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=config.qformer.initializer_range)
            nn.init.zeros_(head.bias)

    def temperature(self) -> Tensor:
        """The ITC temperature. The parameter itself is kept in [min, max] (in place, as LAVIS and
        ALBEF do), so that at a bound its gradient does not vanish and it can come back."""
        with torch.no_grad():
            self.temp.clamp_(self.config.min_temperature, self.config.max_temperature)
        return self.temp

    def image_features(self, query_hidden: Tensor) -> Tensor:
        """(B, Q, D) query outputs -> (B, Q, E) L2-normalised image features."""
        return F.normalize(self.vision_proj(query_hidden), dim=-1)

    def text_pass(self, input_ids: Tensor, attention_mask: Tensor) -> QFormerOutput:
        """Text alone (ITC text side)."""
        return self.qformer(input_ids=input_ids, attention_mask=attention_mask)

    def text_features(self, text_hidden: Tensor) -> Tensor:
        """(B, T, D) text outputs -> (B, E) L2-normalised [CLS] features."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def itm_logits(self, multimodal_hidden: Tensor) -> Tensor:
        """ITM head averaged over the query positions: (B, Q + T, D) -> (B, 2)."""
        return self.itm_head(multimodal_hidden[:, : self.num_query_tokens]).mean(dim=1)

    @staticmethod
    def similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Image-text similarity, the max over queries: (Ni, Q, E) x (Nt, E) -> (Ni, Nt)."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


@dataclass
class Blip2Output:
    loss: Tensor | None
    logits: Tensor  # decoder-only: the text positions (B, T, V); encoder-decoder: the decoder's
    language_model_inputs: Tensor  # (B, Q, H) projected query outputs


def build_language_model(text_config: dict) -> PreTrainedModel:
    """A randomly initialised transformers LLM from its config dict (weights load afterwards)."""
    config = AutoConfig.for_model(**text_config)
    if config.is_encoder_decoder:
        return AutoModelForSeq2SeqLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def move_padding(input_ids: Tensor, attention_mask: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """Move each row's padding to the ``left`` or ``right`` keeping the token order: (B, T).
    A stable sort of a 0/1 key, computed by counting (ONNX has no stable sort): each position
    whose key is 0 goes to the number of 0s before it, each 1 after all the 0s."""
    key = attention_mask.long() if side == "left" else 1 - attention_mask.long()  # (B, T): 0 goes first
    zeros = 1 - key
    target = torch.where(key == 0, zeros.cumsum(1) - 1, zeros.sum(1, keepdim=True) + key.cumsum(1) - 1)  # (B, T)
    positions = torch.arange(key.shape[1], device=key.device).expand_as(key)
    order = torch.zeros_like(target).scatter(1, target, positions)  # order[target[j]] = j
    return input_ids.gather(1, order), attention_mask.gather(1, order)


class Blip2Stage2Model(Blip2Base):
    """BLIP-2's second stage: the queries' outputs, projected, in front of a frozen LLM
    (``AutoModelForCausalLM`` or ``AutoModelForSeq2SeqLM``). ``input_ids`` are text only; the
    model puts the queries in front, no image placeholder tokens."""

    def __init__(
        self, config: Blip2Config, language_model: PreTrainedModel | None = None, vision: nn.Module | None = None
    ) -> None:
        super().__init__(
            config.vision, config.qformer, config.num_query_tokens, config.ln_vision_eps, config.vision_dtype, vision
        )
        self.config = config
        if language_model is None:
            language_model = build_language_model(config.text_config)
        self.language_model = freeze(language_model, DTYPES[config.llm_dtype])
        head = language_model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_foldable_rows)
        self.is_encoder_decoder = bool(language_model.config.is_encoder_decoder)
        width = language_model.get_input_embeddings().weight.shape[1]
        self.language_projection = nn.Linear(config.qformer.hidden_size, width)

    def train(self, mode: bool = True) -> Blip2Stage2Model:
        """The LLM stays in eval mode unless it has trainable (e.g. LoRA) parameters."""
        super().train(mode)
        if not any(p.requires_grad for p in self.language_model.parameters()):
            self.language_model.eval()
        return self

    def language_model_inputs(
        self, image_embeds: Tensor, qformer_input_ids: Tensor | None = None, qformer_attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B, S, W) image embeddings -> (B, Q, H) projected queries, in the LLM's dtype.
        BLIP-2's Q-Former reads no text (InstructBLIP's does)."""
        if qformer_input_ids is not None:
            raise ValueError("BLIP-2's Q-Former reads no instruction; use an InstructBLIP model (qformer.InstructBlip)")
        return self.project(self.query_pass(self.qformer.encoder_key_values(image_embeds)).last_hidden_state)

    def project(self, queries: Tensor) -> Tensor:
        """(B, Q, D) query outputs -> (B, Q, H) LLM inputs, in the LLM's dtype."""
        dtype = self.language_model.get_input_embeddings().weight.dtype
        return self.language_projection(queries.to(self.language_projection.weight.dtype)).to(dtype)

    def _text(self, input_ids: Tensor | None, attention_mask: Tensor | None, batch: int, device: torch.device):
        """Text ids and mask; a decoder-only LLM without a prompt starts from its bos token."""
        if input_ids is None:
            bos = self.language_model.config.bos_token_id
            if self.is_encoder_decoder or bos is None:
                return None, None
            input_ids = torch.full((batch, 1), bos, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return input_ids, attention_mask

    def _inputs_embeds(self, queries: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None):
        """[queries; text] embeddings and mask: (B, Q + T, H), (B, Q + T)."""
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=queries.device)
        if input_ids is None:
            return queries, query_mask
        text = self.language_model.get_input_embeddings()(input_ids)  # (B, T, H), where the LLM's embeddings are
        query_mask = query_mask.to(text.device)
        return (torch.cat([queries.to(text.device), text], dim=1),
                torch.cat([query_mask, attention_mask.to(query_mask)], dim=1))

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        image_features: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Blip2Output:
        """Decoder-only: ``labels`` (B, T) align with ``input_ids``, -100 ignored; logits of the
        text positions. Encoder-decoder: ``input_ids`` go to the encoder after the queries,
        ``labels`` are the decoder's targets."""
        check_stage2_inputs(self, pixel_values, image_features, input_ids, attention_mask, qformer_input_ids,
                            qformer_attention_mask, labels)
        image_embeds = self.image_embeds(pixel_values, image_features)
        queries = self.language_model_inputs(image_embeds, qformer_input_ids, qformer_attention_mask)  # (B, Q, H)
        batch, num_queries = queries.shape[:2]
        input_ids, attention_mask = self._text(input_ids, attention_mask, batch, queries.device)
        inputs_embeds, mask = self._inputs_embeds(queries, input_ids, attention_mask)
        if self.is_encoder_decoder:
            if labels is None and decoder_input_ids is None:
                raise ValueError("an encoder-decoder LLM needs labels or decoder_input_ids (or use generate)")
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
            )
            return Blip2Output(out.loss, out.logits, queries)
        if labels is not None:
            ignore = labels.new_full((batch, num_queries), -100)
            labels = torch.cat([ignore, labels], dim=1)  # (B, Q + T)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels)
        return Blip2Output(out.loss, out.logits[:, num_queries:], queries)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_features: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        **generation_kwargs,
    ) -> Tensor:
        """The new tokens only (B, N), for a text-only prompt per image (any padding side: the
        batch is re-padded so that each row generates as it would alone). With
        ``return_dict_in_generate=True``, transformers' output, its ``sequences`` the new tokens only
        (so that ``logits``, ``scores``, ... have one entry per column)."""
        check_generation(generation_kwargs)
        check_stage2_inputs(self, pixel_values, image_features, input_ids, attention_mask, qformer_input_ids,
                            qformer_attention_mask, max_new_tokens=generation_kwargs.get("max_new_tokens"))
        if input_ids is not None and self.config.image_token_index is not None:
            count = int((input_ids == self.config.image_token_index).sum())
            if count:
                raise ValueError(
                    f"input_ids hold {count} image placeholder tokens (id {self.config.image_token_index}); "
                    "pass the text only: the model puts the queries in front itself"
                )
        image_embeds = self.image_embeds(pixel_values, image_features)
        queries = self.language_model_inputs(image_embeds, qformer_input_ids, qformer_attention_mask)
        input_ids, attention_mask = self._text(input_ids, attention_mask, queries.shape[0], queries.device)
        if input_ids is not None:
            side = "right" if self.is_encoder_decoder else "left"
            input_ids, attention_mask = move_padding(input_ids, attention_mask, side)
        inputs_embeds, mask = self._inputs_embeds(queries, input_ids, attention_mask)
        if not self.is_encoder_decoder:
            generation_kwargs = self._shared_prefix(inputs_embeds, mask, generation_kwargs)
        out = self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **generation_kwargs)
        if not self.is_encoder_decoder:
            return out
        if isinstance(out, Tensor):
            return out[:, 1:]  # drop the decoder start token
        out.sequences = out.sequences[:, 1:]
        return out

    def _shared_prefix(self, inputs_embeds: Tensor, mask: Tensor, generation_kwargs: dict) -> dict:
        """Where generate runs n > 1 rows per image (beams, returned sequences), the LLM's cache of
        all prompt positions but the last, computed once per image and repeated n times: the
        rows of an image share that prefix, which transformers would otherwise prefill n times.
        An encoder-decoder LLM's encoder already runs once per input."""
        config = self.language_model.generation_config
        rows = max(generation_kwargs.get("num_beams") or config.num_beams or 1,
                   generation_kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        cache_key = cache_argument(self.language_model)
        static = generation_kwargs.get("cache_implementation") or config.cache_implementation
        if rows == 1 or inputs_embeds.shape[1] < 2 or cache_key in generation_kwargs or static:
            return generation_kwargs
        positions = {}
        if "position_ids" in inspect.signature(self.language_model.forward).parameters:
            # generate's positions: padding-aware, as it would compute them for the whole prompt
            positions["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, :-1]
        prefix = self.language_model(inputs_embeds=inputs_embeds[:, :-1], attention_mask=mask[:, :-1],
                                     use_cache=True, logits_to_keep=1, **positions)
        cache = prefix[cache_key]
        cache.batch_repeat_interleave(rows)  # (B x n, ...) in generate's order: each image's rows together
        return {**generation_kwargs, cache_key: cache}
