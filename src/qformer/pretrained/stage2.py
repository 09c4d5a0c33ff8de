"""``qformer.Blip2``: a stage-2 BLIP-2 with its tokenizer and image preprocessing, loaded from
and saved to transformers' layout, for captioning and visual question answering."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from qformer.checkpoint import atomic_write, load_state_dict_strict
from qformer.checks import check_images
from qformer.config import Blip2Config
from qformer.data.transforms import eval_transform
from qformer.devices import DeviceArg, DeviceMapArg, DtypeArg
from qformer.loading import resolve_checkpoint
from qformer.models.blip2 import Blip2Stage1Model, Blip2Stage2Model
from qformer.models.instructblip import InstructBlipStage2Model
from qformer.models.qformer import QFormerModel
from qformer.pretrained.qformer import QFormer
from qformer.pretrained.ranking import candidate_log_likelihoods
from qformer.pretrained.stage1 import stage1_layout_of
from qformer.pretrained.transformers import (
    load_transformers_blip2,
    load_transformers_instructblip,
    save_transformers_blip2,
    save_transformers_instructblip,
)
from qformer.tokenizer import directory_tokenizer, save_tokenizer, without_call_state

logger = logging.getLogger(__name__)

CAPTION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}
VQA_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}
ImageInput = str | Path | Image.Image
IMAGE_TOKEN = "<image>"  # transformers' placeholder for the queries in the LLM's input
GENERATION_CONFIG_NAME = "generation_config.json"


def reserve_image_token(tokenizer: PreTrainedTokenizerBase, language_model: PreTrainedModel) -> int:
    """The LLM vocabulary id of ``<image>``, which transformers' layout puts where the queries go.
    Added to the tokenizer when it has none, as BLIP-2's released models have it; when the LLM's
    embeddings have no spare row for it (LLaMA's 32000), they grow by one, the new rows (input and
    output) the mean of the others, so that rebuilding the model gives the same weights."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = language_model.get_input_embeddings().weight.shape[0]
    if index >= rows:
        language_model.resize_token_embeddings(index + 1, mean_resizing=False)
        with torch.no_grad():
            for table in {id(t): t for t in (language_model.get_input_embeddings(),
                                             language_model.get_output_embeddings()) if t is not None}.values():
                table.weight[rows:] = table.weight[:rows].mean(dim=0)
    return index


class Blip2(Blip2Stage2Model):
    """BLIP-2 with an LLM, ready to caption and answer. ``Blip2.from_pretrained`` takes a
    transformers-layout directory (``Salesforce/blip2-opt-2.7b``, ``blip2-flan-t5-xl``, ...)."""

    reads_instruction = False
    qformer_class = QFormer

    def __init__(
        self,
        config: Blip2Config,
        language_model: PreTrainedModel | None = None,
        vision: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(config, language_model, vision)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: DtypeArg = None,
        device: DeviceArg = None,
        device_map: DeviceMapArg = None,
        max_memory: Mapping | None = None,
        quantization_config: Any = None,
    ) -> Blip2:
        """A transformers-layout directory (or hub id) of BLIP-2 (``Blip2ForConditionalGeneration``)
        or of InstructBLIP (``InstructBlipForConditionalGeneration``, returned as :class:`InstructBlip`).

        ``dtype`` as transformers: None or ``"auto"`` keeps the checkpoint's; ``float16`` keeps
        what transformers keeps in fp32 (BLIP-2: the queries and the Q-Former; the LLM's own
        ``_keep_in_fp32_modules``, e.g. T5's ``wo``); any spelling (``bf16``, ``torch.bfloat16``).
        ``device`` puts it all on one device; ``device_map="auto"`` (or a map of module names)
        spreads the LLM's layers over the GPUs and the CPU, the rest staying on one device.
        ``quantization_config`` (transformers', e.g. ``BitsAndBytesConfig(load_in_8bit=True)``)
        quantises the LLM as transformers loads it."""
        directory = resolve_checkpoint(path_or_hub_id)
        values = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        model_type = values.get("model_type")
        if stage1_layout_of(values) is not None:
            raise ValueError(f"{path_or_hub_id} holds a stage-1 model (image-text matching, no LLM): load it with "
                             "Blip2Stage1Model.from_pretrained (qformer retrieve, qformer serve, qformer eval --task "
                             "coco_retrieval)")
        target = InstructBlip if model_type == "instructblip" else cls
        model, report = target.load_weights(directory, dtype=dtype, device=device, device_map=device_map,
                                            max_memory=max_memory, quantization_config=quantization_config)
        if report.dropped:
            logger.debug("loaded %s\n%s", directory, report.summary())
        model.tokenizer = directory_tokenizer(directory)
        model.load_extra_tokenizers(directory)
        return model.eval()

    @classmethod
    def load_weights(cls, directory: Path, **options: Any):
        return load_transformers_blip2(directory, cls, **options)

    def load_extra_tokenizers(self, directory: Path) -> None:
        """BLIP-2 has one tokenizer (InstructBLIP adds the Q-Former's)."""

    def save_pretrained(self, directory: str | Path) -> None:
        """transformers' layout (``Blip2ForConditionalGeneration.from_pretrained`` loads it), with
        the tokenizer and ``generation_config.json``; every file is written atomically.

        The stop ids go into ``text_config.eos_token_id`` as well: transformers' BLIP-2 and
        InstructBLIP ``generate`` hand the work to the LLM's ``generate``, whose defaults come
        from the text config, not from the top-level ``generation_config.json``, so that is where
        transformers' ``generate``, its pipelines and ``qformer caption`` all read the same stops
        (the released OPT models hold "\n" there for the same reason)."""
        directory = Path(directory)
        clean = None if self.tokenizer is None else without_call_state(self.tokenizer)  # leaves ours as it is
        stops = self.stop_token_ids(clean)
        text_config = {**self.config.text_config}
        if stops:
            text_config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
        self.save_layout(self.config.replace(text_config=text_config), directory)
        generation = self.caption_generation_config(clean).to_json_string(use_diff=True)
        atomic_write(directory / GENERATION_CONFIG_NAME, lambda tmp: Path(tmp).write_text(generation, encoding="utf-8"))
        save_tokenizer(self.tokenizer, directory)
        self.save_extra_tokenizers(directory)

    def save_layout(self, config: Blip2Config, directory: Path) -> None:
        save_transformers_blip2(self, config, directory)

    def save_extra_tokenizers(self, directory: Path) -> None:
        """BLIP-2 has one tokenizer (InstructBLIP adds the Q-Former's)."""

    @classmethod
    def from_stage1(
        cls,
        stage1: Blip2Stage1Model,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **config_overrides: Any,
    ) -> Blip2:
        """Stage 2 from a stage-1 model: image encoder, ``ln_vision``, queries and the
        Q-Former's query path carry over; its text path (kept by InstructBLIP, which reads the
        instruction with it) and heads are dropped, as in BLIP-2. With a tokenizer, the config's
        ``image_token_index`` is ``<image>``'s id (see :func:`reserve_image_token`), so that the
        model saves as a complete transformers directory."""
        if cls.reads_instruction:
            qformer = stage1.config.qformer.replace(use_lm_head=False)
        else:
            qformer = stage1.config.qformer.replace(use_text_input=False, use_lm_head=False, bos_token_id=None)
        if tokenizer is not None and "image_token_index" not in config_overrides:
            config_overrides["image_token_index"] = reserve_image_token(tokenizer, language_model)
        config = Blip2Config(
            vision=stage1.config.vision,
            qformer=qformer,
            text_config=language_model.config.to_dict(),
            num_query_tokens=stage1.config.num_query_tokens,
            ln_vision_eps=stage1.config.ln_vision_eps,
            vision_dtype=stage1.config.vision_dtype,
            image=stage1.config.image,
            **config_overrides,
        )
        model = cls(config, language_model, vision=stage1.vision, tokenizer=tokenizer)
        model.ln_vision.load_state_dict(stage1.ln_vision.state_dict())
        model.query_tokens.data.copy_(stage1.query_tokens.data)
        kept = QFormerModel(qformer).state_dict().keys()
        model.qformer.load_state_dict({k: v for k, v in stage1.qformer.state_dict().items() if k in kept})
        return model

    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: Any = None) -> None:
        """LoRA adapters on the LLM (peft); only they train there. ``target_modules`` defaults
        to peft's choice for the architecture."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
        self.language_model = get_peft_model(self.language_model, config)

    def preprocess(self, images: Sequence[ImageInput]):
        """Images (paths or PIL) -> pixel values (B, 3, S, S) in the image encoder's dtype, on its device."""
        first = next((self.ln_vision if self.vision is None else self.vision).parameters())
        return eval_transform(images, self.config.image).to(device=first.device, dtype=first.dtype)

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer= or load a directory that has one")
        return self.tokenizer

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
        """Where generation stops: the LLM config's ``eos_token_id`` (one id or a list, as
        transformers reads it; the tokenizer's eos, or else its separator, where the config names
        none) and, for a
        decoder-only LLM, the last token of ``config.text_suffix``: "\\n" for OPT, which BLIP-2
        appends to every caption it trains on and the released OPT models name as their eos.
        A directory whose config omits it still stops there here; :meth:`save_pretrained` writes
        the whole list into the config, so that transformers stops at the same ids. Without a
        tokenizer (a conversion given none), the config's ids alone. ``tokenizer`` finds the
        suffix's id (default: the model's, whose truncation and padding from a past call any call
        resets)."""
        configured = self.config.text_config.get("eos_token_id")
        ids = list(configured) if isinstance(configured, list) else [] if configured is None else [configured]
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            return ids
        if not ids and tokenizer.eos_token_id is not None:
            ids = [tokenizer.eos_token_id]
        if not ids and tokenizer.sep_token_id is not None:  # a BERT's: its texts end in [SEP], it names no eos
            ids = [tokenizer.sep_token_id]
        if self.config.text_suffix and not self.is_encoder_decoder:
            suffix = tokenizer(self.config.text_suffix, add_special_tokens=False).input_ids
            ids += [i for i in suffix[-1:] if i not in ids]
        return ids

    def caption_generation_config(self, tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationConfig:
        """``qformer caption``'s decoding (:data:`CAPTION_DEFAULTS`, the stop ids, the padding and
        start ids) as transformers' ``GenerationConfig``, which :meth:`save_pretrained` writes as
        ``generation_config.json``. transformers' BLIP-2 ``generate`` does not read the model's
        own (it calls the LLM's): pass it, ``model.generate(**inputs,
        generation_config=model.generation_config)``, or to a pipeline call, to decode as
        ``qformer caption`` does. ``tokenizer`` as :meth:`stop_token_ids`."""
        tokenizer = tokenizer or self.tokenizer
        text = self.config.text_config
        starts = {"decoder_start_token_id": text.get("decoder_start_token_id")} if self.is_encoder_decoder else {}
        pad = text.get("pad_token_id") if tokenizer is None else tokenizer.pad_token_id
        return GenerationConfig(**CAPTION_DEFAULTS, eos_token_id=self.stop_token_ids(tokenizer), pad_token_id=pad,
                                bos_token_id=text.get("bos_token_id"), **starts)

    def generate_text(self, images: Sequence[ImageInput], prompts: Sequence[str], **generation: Any) -> list[str]:
        """One prompt per image; returns the decoded new text."""
        tokens = self.generate_ids(images, prompts, **generation)
        return [t.strip() for t in self._tokenizer().batch_decode(tokens, skip_special_tokens=True)]

    def generate_ids(self, images: Sequence[ImageInput], prompts: Sequence[str], **generation: Any) -> Any:
        """One prompt per image; the new tokens (B x num_return_sequences, N), padded after each
        row's end, or with ``return_dict_in_generate=True`` transformers' output (see
        :meth:`generate`). Stops at :meth:`stop_token_ids` unless ``eos_token_id`` is given."""
        check_images(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        tokenizer = self._tokenizer()
        text = tokenizer(list(prompts), padding=True, return_tensors="pt").to(self.ln_vision.weight.device)
        generation.setdefault("eos_token_id", self.stop_token_ids())
        generation.setdefault("pad_token_id", tokenizer.pad_token_id)
        pixels = self.preprocess(images)
        return self.generate(pixels, text.input_ids, text.attention_mask, **self.instruction(prompts), **generation)

    def rank_candidates(self, images: Sequence[ImageInput], prompts: Sequence[str],
                        candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """One prompt and a list of candidate answers per image: each candidate's summed token
        log-likelihood, as InstructBLIP ranks them (:mod:`qformer.pretrained.ranking`)."""
        check_images(images)
        return candidate_log_likelihoods(self, images, prompts, candidates)

    def instruction(self, prompts: Sequence[str]) -> dict[str, Any]:
        """What the Q-Former reads of the prompts: nothing for BLIP-2 (see :class:`InstructBlip`)."""
        return {}

    def caption(self, images: Sequence[ImageInput], prompt: str | None = None, **generation: Any) -> list[str]:
        """A caption per image (beam search, 5 beams, as BLIP-2), after an optional prompt."""
        return self.generate_text(images, [prompt or ""] * len(images), **{**CAPTION_DEFAULTS, **generation})

    def answer(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        prompt: str = "Question: {} Answer:",
        **generation: Any,
    ) -> list[str]:
        """Short answers, one question per image, in BLIP-2's VQA prompt."""
        prompts = [prompt.format(q) for q in questions]
        return self.generate_text(images, prompts, **{**VQA_DEFAULTS, **generation})


class InstructBlip(Blip2, InstructBlipStage2Model):
    """InstructBLIP ready to caption and answer: the prompt goes to the LLM and, through the
    Q-Former's tokenizer (``qformer_tokenizer``, truncating on the left), to the Q-Former too.
    ``Blip2.from_pretrained`` returns one for an ``InstructBlipForConditionalGeneration``
    directory (the Q-Former's tokenizer in its ``qformer_tokenizer/`` folder, as transformers'
    processor saves it)."""

    reads_instruction = True
    qformer_tokenizer: PreTrainedTokenizerBase | None = None
    qformer_max_length: int = 256

    # what a Q-Former's text path must share with the Q-Former it joins
    TEXT_PATH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                        "layer_norm_eps")

    @classmethod
    def load_weights(cls, directory: Path, **options: Any):
        return load_transformers_instructblip(directory, cls, **options)

    @classmethod
    def from_blip2(
        cls, blip2: Blip2, text_source: QFormerModel, qformer_tokenizer: PreTrainedTokenizerBase | None = None
    ) -> InstructBlip:
        """A BLIP-2 whose Q-Former reads the prompt with the queries: everything from ``blip2``
        (its image encoder and LLM shared, not copied) and the Q-Former's text path (word and
        position embeddings, the text FFNs) from ``text_source``, e.g. the stage-1 Q-Former
        ``blip2`` was trained from (BLIP-2's released stage-2 models drop the text path). This
        is how BLIP-2 fine-tunes for VQA (Section 4.3: the question tokens go to the Q-Former
        too and meet the queries in self-attention), and InstructBLIP's architecture."""
        ours, theirs = blip2.config.qformer, text_source.config
        differ = [f"{name} {getattr(theirs, name)} vs {getattr(ours, name)}" for name in cls.TEXT_PATH_FIELDS
                  if getattr(theirs, name) != getattr(ours, name)]
        if differ:
            raise ValueError(f"its Q-Former is not this one's shape: {', '.join(differ)}")
        text_fields = ("vocab_size", "pad_token_id", "bos_token_id", "max_position_embeddings", "type_vocab_size")
        qformer = ours.replace(use_text_input=True, use_lm_head=False,
                               **{name: getattr(theirs, name) for name in text_fields})
        model = cls(blip2.config.replace(qformer=qformer.to_dict()), blip2.language_model, vision=blip2.vision,
                    tokenizer=blip2.tokenizer)
        shared, given = blip2.qformer.state_dict(), text_source.state_dict()
        wanted = model.qformer.state_dict().keys()
        missing = sorted(k for k in wanted if k not in shared and k not in given)
        if missing:
            raise ValueError(f"it has no text path ({', '.join(missing[:3])}, ...)")
        load_state_dict_strict(model.qformer, {k: shared[k] if k in shared else given[k] for k in wanted})
        for name in ("ln_vision", "language_projection"):
            getattr(model, name).load_state_dict(getattr(blip2, name).state_dict())
        model.query_tokens.data.copy_(blip2.query_tokens.data)
        model.qformer_tokenizer = qformer_tokenizer
        return model

    def load_extra_tokenizers(self, directory: Path) -> None:
        folder = directory / "qformer_tokenizer"
        if (folder / "tokenizer_config.json").is_file():
            self.qformer_tokenizer = AutoTokenizer.from_pretrained(str(folder), truncation_side="left")

    def save_layout(self, config: Blip2Config, directory: Path) -> None:
        save_transformers_instructblip(self, config, directory)

    def save_extra_tokenizers(self, directory: Path) -> None:
        save_tokenizer(self.qformer_tokenizer, directory / "qformer_tokenizer")

    def instruction(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The prompts as the Q-Former reads them: ``qformer_input_ids`` and its mask (B, T)."""
        if self.qformer_tokenizer is None:
            raise ValueError("this InstructBLIP model has no Q-Former tokenizer: set model.qformer_tokenizer")
        text = self.qformer_tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.qformer_max_length, return_tensors="pt"
        ).to(self.ln_vision.weight.device)
        return {"qformer_input_ids": text.input_ids, "qformer_attention_mask": text.attention_mask}
