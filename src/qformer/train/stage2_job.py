"""Stage 2 for the trainer: the LLM bridge, its collation, held-out captioning and VQA."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from qformer.config import ImageConfig
from qformer.data.datasets import VQADataset
from qformer.data.text import decoder_only_batch, encoder_decoder_batch, prefix_lm_split
from qformer.devices import DTYPES, dtype_name
from qformer.models.blip2 import freeze
from qformer.pretrained.qformer import QFormer
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.pretrained.stage2 import VQA_DEFAULTS, Blip2, InstructBlip
from qformer.tokenizer import load_tokenizer
from qformer.train.config import ModelSpec, TrainConfig
from qformer.train.distributed import Runtime
from qformer.train.image_encoder import prepare_image_encoder
from qformer.train.job import Job, check_sources, eval_pixels, evaluate_sets, fit_image_size, resolve_bert, save_final


def build_model(config: TrainConfig) -> Blip2:
    """The stage-2 model: a BLIP-2 / InstructBLIP directory (``model.blip2``) or stage 1 and an
    LLM; a Q-Former that reads the prompt (``model.instruct``, ``model.question_to_qformer``) is
    InstructBLIP's; the image encoder trained with ``model.freeze_vit: false``."""
    spec = config.model
    check_sources(spec)
    if spec.blip2:
        # trained parts in fp32 whatever the file stores; the frozen LLM in model.llm_dtype
        model = Blip2.from_pretrained(spec.blip2, dtype="float32")
        freeze(model.language_model, DTYPES[dtype_name(spec.llm_dtype)])
        model.config.llm_dtype = dtype_name(spec.llm_dtype)
        if spec.reads_prompt and not model.reads_instruction:
            model = _with_text_path(model, spec)
        elif spec.init_from and model.reads_instruction:
            raise ValueError(f"model.init_from: {spec.blip2} is InstructBLIP, its Q-Former has a text path already: "
                             "leave model.init_from unset")
        elif spec.init_from:
            raise ValueError("model.init_from: with model.blip2, a stage-1 model only gives the Q-Former a text path "
                             "(model.question_to_qformer or model.instruct): set one of those or leave it unset")
    else:
        language_model = resolve_bert(spec.language_model)  # "minilm": a BERT read left to right, for tiny runs
        llm_config = AutoConfig.from_pretrained(language_model)
        auto = AutoModelForSeq2SeqLM if llm_config.is_encoder_decoder else AutoModelForCausalLM
        # A BERT reads left to right only as a decoder: without is_decoder it attends both ways
        # and keeps no cache, so that its stage-2 model could not generate.
        as_decoder = {"is_decoder": True} if llm_config.model_type == "bert" else {}
        llm = auto.from_pretrained(language_model, **as_decoder)
        tokenizer = AutoTokenizer.from_pretrained(language_model)
        stage1 = Blip2Stage1.from_pretrained(spec.init_from)
        kind = InstructBlip if spec.reads_prompt else Blip2
        model = kind.from_stage1(stage1, llm, tokenizer, llm_dtype=spec.llm_dtype)
        if spec.reads_prompt:
            model.qformer_tokenizer = _qformer_tokenizer(spec, stage1)
    fit_image_size(model, config.data.image_size)
    if spec.lora_r:
        model.add_lora(r=spec.lora_r, alpha=2 * spec.lora_r)
    prepare_image_encoder(model, spec)
    return model


def _qformer_tokenizer(spec: ModelSpec, stage1: Blip2Stage1) -> PreTrainedTokenizerBase:
    """The tokenizer of a Q-Former that reads the prompt: ``model.tokenizer`` or ``model.bert``,
    else the stage-1 model's; truncating on the left, as InstructBLIP keeps a long prompt's end."""
    path = spec.tokenizer or spec.bert
    if path is not None:
        return load_tokenizer(resolve_bert(path), truncation_side="left")
    if stage1.tokenizer is None:
        raise ValueError(f"the Q-Former reads the prompt and model.init_from {spec.init_from} has no tokenizer: set "
                         "model.tokenizer or model.bert")
    stage1.tokenizer.truncation_side = "left"
    return stage1.tokenizer


def _with_text_path(model: Blip2, spec: ModelSpec) -> InstructBlip:
    """A BLIP-2 directory's model whose Q-Former has no text path (the released stage-2 models
    drop it) as InstructBLIP's architecture (:meth:`~qformer.pretrained.stage2.InstructBlip.from_blip2`),
    the text path from the stage-1 model ``model.init_from``, or else from the BERT
    ``model.bert`` (as LAVIS's InstructBLIP gets it: its Q-Former starts from bert-base-uncased
    and the BLIP-2 checkpoint, which has no text path, loads over it)."""
    what = "model.question_to_qformer" if spec.question_to_qformer else "model.instruct"
    if spec.init_from:
        stage1 = Blip2Stage1.from_pretrained(spec.init_from, dtype="float32")
        source, tokenizer, key = stage1.qformer, _qformer_tokenizer(spec, stage1), f"model.init_from {spec.init_from}"
    elif spec.bert:
        q = model.config.qformer
        source = QFormer.from_bert(resolve_bert(spec.bert), encoder_hidden_size=q.encoder_hidden_size,
                                   cross_attention_frequency=q.cross_attention_frequency)
        tokenizer, key = load_tokenizer(resolve_bert(spec.tokenizer or spec.bert), truncation_side="left"), "model.bert"
    else:
        raise ValueError(f"{what}: the Q-Former of {spec.blip2} has no text path (BLIP-2's stage-2 models drop it): "
                         "set model.init_from to a stage-1 model to take it from (the one it was trained from: "
                         "`qformer convert` LAVIS's blip2_pretrained.pth), or model.bert")
    try:
        return InstructBlip.from_blip2(model, source, tokenizer)
    except ValueError as err:
        raise ValueError(f"{what}: {key} does not fit {spec.blip2}: {err}") from None


class Stage2Collator:
    """Pixels plus the LLM's inputs and labels: decoder-only [bos prompt caption suffix];
    encoder-decoder: prompt -> caption, or a prefix-LM split of the caption when there is no
    prompt (seeded by the sample, so the split is reproducible). Skipped samples are handled
    by the trainer's :class:`~qformer.train.data.RefillSkipped`."""

    def __init__(self, model: Blip2, prompt: str, max_length: int, seed: int) -> None:
        # tokenizers only: the collator travels to the DataLoader's worker processes
        self.tokenizer, self.prompt, self.max_length, self.seed = model.tokenizer, prompt, max_length, seed
        self.qformer_tokenizer = model.qformer_tokenizer if model.reads_instruction else None
        self.encoder_decoder = model.is_encoder_decoder
        self.suffix = model.config.text_suffix or (model.tokenizer.eos_token or "")

    def __call__(self, kept: list[dict]) -> dict:
        texts = [s["text"] for s in kept]
        batch: dict[str, Any] = {"texts": texts}
        prompts = [s.get("instruction", self.prompt) for s in kept]  # instruction data: loss on the answer
        if self.qformer_tokenizer is not None:  # InstructBLIP: the Q-Former reads the instruction too
            q = self.qformer_tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
            batch.update(qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask)
        if self.encoder_decoder:
            if any(prompts):
                inputs, outputs = prompts, texts
            else:
                pairs = [prefix_lm_split(t, random.Random(self.seed * 7919 + int(s["image_id"]))) for s, t in zip(kept, texts)]
                inputs, outputs = [p for p, _ in pairs], [o for _, o in pairs]
            text = encoder_decoder_batch(self.tokenizer, inputs, outputs, self.max_length)
        else:
            text = decoder_only_batch(self.tokenizer, prompts, texts, self.suffix, self.max_length)
        batch.update(pixel_values=torch.stack([s["image"] for s in kept]), input_ids=text.input_ids,
                     attention_mask=text.attention_mask, labels=text.labels)
        return batch


def build(
    config: TrainConfig, runtime: Runtime, dataset: Dataset, evaluation: dict[str, Dataset], image: ImageConfig
) -> Job:
    model = build_model(config)

    def losses(module: nn.Module, batch: dict, generator: torch.Generator) -> dict:
        instruction = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
        out = module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                     **instruction)
        return {"loss": out.loss}

    def captioning(module: Blip2, data: Dataset) -> dict[str, Any]:
        return evaluate_captions(module, data, image, config.model.prompt)

    def answering(module: Blip2, data: Dataset) -> dict[str, Any]:
        return evaluate_vqa(module, data, image, config.data.vqa_prompt)

    evaluate = evaluate_sets(answering if config.data.source == "vqa" else captioning, evaluation)

    collate = Stage2Collator(model, config.model.prompt, config.data.max_text_length, config.seed)
    return Job(model, model, dataset, collate, losses, evaluate, model.tokenizer, save_final=save_final)


def generate_texts(model: Blip2, samples: list[dict], prompts: list[str], image: ImageConfig,
                   **generation: Any) -> list[str]:
    """The text generated for each sample's image after its prompt (eos and pad from the model)."""
    device = model.ln_vision.weight.device
    tokenizer = model.tokenizer
    generation = {"eos_token_id": model.stop_token_ids(), "pad_token_id": tokenizer.pad_token_id, **generation}
    text = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
    tokens = model.generate(eval_pixels(samples, image).to(device), text.input_ids, text.attention_mask,
                            **model.instruction(prompts), **generation)
    return [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


@torch.no_grad()
def evaluate_captions(
    model: Blip2, data: Dataset, image: ImageConfig, prompt: str = "", chunk: int = 32, **generation: Any
) -> dict[str, Any]:
    """Greedy captions of a held-out set against its references (a sample's ``references``, e.g.
    every paraphrase of a scene's caption, or else its ``text``): exact match (equal to any
    reference) and CIDEr."""
    from qformer.evaluate.captions import caption_metrics, exact_match

    samples = [s for s in (data[i] for i in range(len(data))) if s is not None]
    predictions: dict[int, str] = {}
    references: dict[int, list[str]] = {}
    generation = {"max_new_tokens": 20, "num_beams": 1, **generation}
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        prompts = [s.get("instruction", prompt) for s in part]
        for offset, (sample, caption) in enumerate(zip(part, generate_texts(model, part, prompts, image, **generation))):
            key = start + offset
            predictions[key] = caption
            references[key] = sample.get("references") or [sample["text"]]
    metrics = caption_metrics(predictions, references, metrics=("CIDEr",))
    keys = list(predictions)[:: max(1, len(predictions) // 16)][:16]  # spread over the set
    shown = [{"index": k, "prediction": predictions[k], "reference": references[k][0]} for k in keys]
    return {"exact_match": exact_match(predictions, references), "cider": metrics["CIDEr"], "samples": shown}


@torch.no_grad()
def evaluate_vqa(
    model: Blip2, data: VQADataset, image: ImageConfig, prompt: str = "Question: {} Answer:", chunk: int = 32,
    **generation: Any
) -> dict[str, Any]:
    """Short answers generated for a held-out VQA set (BLIP-2's settings: 5 beams, at most 10
    new tokens, length penalty -1), scored against every human answer of each question with
    :func:`~qformer.evaluate.vqa.vqa_score`: ``accuracy`` (percent), ``count`` (questions with a
    readable image) and ``predictions`` (every ``{"question_id", "answer"}``, the VQA
    challenge's result format)."""
    from qformer.evaluate.vqa import vqa_score

    generation = {**VQA_DEFAULTS, **generation}
    predictions: list[dict[str, Any]] = []
    truths: list[list[str]] = []
    for start in range(0, len(data), chunk):  # images decoded a chunk at a time
        indices = range(start, min(start + chunk, len(data)))
        part = [(data[i], data.records[i].answers) for i in indices]
        part = [(sample, answers) for sample, answers in part if sample is not None]
        if not part:
            continue
        samples = [sample for sample, _ in part]
        prompts = [prompt.format(sample["question"]) for sample in samples]
        for sample, answer in zip(samples, generate_texts(model, samples, prompts, image, **generation)):
            predictions.append({"question_id": sample["question_id"], "answer": answer})
        truths.extend(answers for _, answers in part)
    score = vqa_score([p["answer"] for p in predictions], truths)
    return {**score, "predictions": predictions}
