"""Stage 1 for the trainer: the model, its objective, collation and held-out retrieval."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from qformer.checkpoint import load_state_dict_strict
from qformer.config import ImageConfig
from qformer.data.collate import CaptionCollator
from qformer.objective import Stage1Objective
from qformer.pretrained.qformer import QFormer
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.retrieval import RERANK_DEPTH, retrieval_recall, retrieval_scores
from qformer.tokenizer import load_tokenizer
from qformer.train.config import TrainConfig
from qformer.train.distributed import Runtime
from qformer.train.image_encoder import prepare_image_encoder
from qformer.train.job import Job, check_sources, eval_pixels, evaluate_sets, fit_image_size, resolve_bert

logger = logging.getLogger(__name__)


def build_model(config: TrainConfig) -> tuple[Blip2Stage1, Any]:
    """The stage-1 model: from ``model.init_from``, or new, its Q-Former from BERT when
    ``model.bert`` is set (as BLIP-2), the image encoder from ``model.vision_weights`` when set;
    the image encoder trained with ``model.freeze_vit: false``."""
    check_sources(config.model)
    model, tokenizer = _from_stage1(config) if config.model.init_from else _new_stage1(config)
    prepare_image_encoder(model, config.model)
    return model, tokenizer


def _new_stage1(config: TrainConfig) -> tuple[Blip2Stage1, Any]:
    """A new stage-1 model as ``model.stage1`` describes it."""
    spec = config.model
    stage1 = spec.stage1.replace(image=ImageConfig(size=config.data.image_size).to_dict())  # what it trains on
    tokenizer_path = spec.tokenizer or (resolve_bert(spec.bert) if spec.bert else None)
    if tokenizer_path is None:
        raise ValueError("stage 1 needs a Q-Former tokenizer: set model.bert or model.tokenizer")
    tokenizer = load_tokenizer(resolve_bert(tokenizer_path))
    if spec.bert is None:
        model = Blip2Stage1(stage1)
    else:
        q = stage1.qformer
        qformer = QFormer.from_bert(
            resolve_bert(spec.bert),
            encoder_hidden_size=q.encoder_hidden_size,
            cross_attention_frequency=q.cross_attention_frequency,
            lm_label_smoothing=q.lm_label_smoothing,
        )
        model = Blip2Stage1(stage1.replace(qformer=qformer.config))
        model.qformer.load_state_dict(qformer.state_dict())
    if spec.vision_weights:
        load_vision_weights(model, spec.vision_weights)
    fit_image_size(model, config.data.image_size)
    model.tokenizer = tokenizer  # saved with it: final/ is ready for Blip2Stage1.from_pretrained
    return model, tokenizer


def _from_stage1(config: TrainConfig) -> tuple[Blip2Stage1, Any]:
    """``model.init_from``: a stage-1 model to go on training (retrieval fine-tuning starts from
    stage 1, as LAVIS's ``retrieval_coco_ft.yaml`` loads ``blip2_pretrained.pth``), with its own
    architecture and tokenizer, its encoder at ``data.image_size``."""
    spec = config.model
    if spec.bert or spec.vision_weights:
        raise ValueError("model.init_from brings its Q-Former and image encoder: leave model.bert and "
                         "model.vision_weights unset")
    model = Blip2Stage1.from_pretrained(spec.init_from, dtype="float32")
    tokenizer = load_tokenizer(resolve_bert(spec.tokenizer)) if spec.tokenizer else model.tokenizer
    if tokenizer is None:
        raise ValueError(f"model.init_from {spec.init_from} has no tokenizer: set model.tokenizer")
    logger.info("stage 1 from %s (its architecture; model.stage1 is not used)", spec.init_from)
    fit_image_size(model, config.data.image_size)
    model.tokenizer = tokenizer
    return model, tokenizer


def load_vision_weights(model: Blip2Stage1, source: str) -> None:
    """The frozen image encoder's weights from ``source`` (see
    :func:`~qformer.pretrained.conversion.read_vision_weights`); every weight of the encoder must be
    there, with its shape, and what the source holds beyond it is logged."""
    from qformer.pretrained.conversion import read_vision_weights

    if model.vision is None:
        raise ValueError("model.vision_weights: this stage-1 config has no image encoder (stage1.vision is null)")
    weights, report = read_vision_weights(source, model.config.vision.num_hidden_layers)
    try:
        load_state_dict_strict(model.vision, {key.removeprefix("vision."): value for key, value in weights.items()})
    except ValueError as err:
        raise ValueError(f"model.vision_weights {source} does not fit model.stage1.vision: {err}") from None
    if report.dropped:
        logger.info("image encoder from %s; left out: %s", source, report.dropped)


def build(
    config: TrainConfig, runtime: Runtime, dataset: Dataset, evaluation: dict[str, Dataset], image: ImageConfig
) -> Job:
    model, tokenizer = build_model(config)
    objective = Stage1Objective(model, group=runtime.group)

    def losses(module: nn.Module, batch: dict, generator: torch.Generator) -> dict:
        out = module(
            batch["input_ids"],
            batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_ids=batch["image_ids"],
            generator=generator,
        )
        return {"loss": out.loss, "itc": out.itc, "itm": out.itm, "itg": out.itg}

    def retrieval(module: Blip2Stage1, data: Dataset) -> dict[str, Any]:
        return evaluate_retrieval(module, data, tokenizer, image, config.data.max_text_length)

    evaluate = evaluate_sets(retrieval, evaluation)

    # the objective gathers token ids across processes: one text length for every batch there
    collate = CaptionCollator(tokenizer, config.data.max_text_length, pad_to_max_length=runtime.world_size > 1)

    return Job(model, objective, dataset, collate, losses, evaluate, tokenizer, save_final=Blip2Stage1.save_pretrained)


@torch.no_grad()
def evaluate_retrieval(
    model: Blip2Stage1,
    data: Dataset,
    tokenizer,
    image: ImageConfig,
    max_length: int,
    k: int = RERANK_DEPTH,
    chunk: int = 64,
) -> dict[str, Any]:
    """Image<->text recall@1/5/10 over a held-out set (one caption per image: its canonical or
    first caption), ITC top-k re-ranked by ITM."""
    device = model.ln_vision.weight.device
    samples = [s for s in (data[i] for i in range(len(data))) if s is not None]
    texts = [s.get("canonical", s["text"]) for s in samples]
    embeds = torch.cat(
        [model.image_embeds(eval_pixels(samples[i : i + chunk], image).to(device)) for i in range(0, len(samples), chunk)]
    )
    text = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt").to(device)
    i2t, t2i = retrieval_scores(model, embeds, text.input_ids, text.attention_mask, k=k)
    metrics = retrieval_recall(i2t, t2i, torch.arange(len(samples), device=device), k=k)
    metrics["chance_r1"] = 100.0 / len(samples)
    metrics["pairs"] = len(samples)
    return metrics
