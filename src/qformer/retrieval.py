"""Stage-1 inference: features, image-text retrieval (ITC candidates re-ranked by ITM) and
its recall@K, captions from the Q-Former alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qformer.generate import DecodingOptions, qformer_generate
from qformer.models.blip2 import Blip2Stage1, expand_key_values


@dataclass
class Features:
    image: Tensor | None = None  # (Ni, Q, E) normalised, one per query
    text: Tensor | None = None  # (Nt, E) normalised [CLS]
    multimodal: Tensor | None = None  # (N, Q, D) query outputs of the joint pass


@torch.no_grad()
def extract_features(
    model: Blip2Stage1,
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


@torch.no_grad()
def itm_match_logits(
    model: Blip2Stage1, image_kv: tuple, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """The ITM "match" logit of each (image, text) row: (N,)."""
    hidden = model.multimodal_pass(input_ids, attention_mask, image_kv).last_hidden_state
    return model.itm_logits(hidden)[:, 1]


@torch.no_grad()
def retrieval_scores(
    model: Blip2Stage1,
    image_embeds: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    k: int = 16,
    chunk: int = 32,
) -> tuple[Tensor, Tensor]:
    """BLIP-2's retrieval scores: the ITC similarity ranks all pairs; the top ``k`` candidates
    of every image (text) are re-scored with ITM logit + ITC similarity; the rest get -100.

    image_embeds (Ni, S, W) after ``ln_vision``; texts (Nt, T). Returns i2t (Ni, Nt), t2i (Nt, Ni).
    """
    n_images, n_texts = image_embeds.shape[0], input_ids.shape[0]
    image_feats = torch.cat(
        [extract_features(model, image_embeds[i : i + chunk]).image for i in range(0, n_images, chunk)]
    )
    text_feats = torch.cat(
        [
            extract_features(model, input_ids=input_ids[i : i + chunk], attention_mask=attention_mask[i : i + chunk]).text
            for i in range(0, n_texts, chunk)
        ]
    )
    sim = model.similarity(image_feats, text_feats)  # (Ni, Nt)

    i2t = torch.full_like(sim, -100.0)
    k_texts = min(k, n_texts)
    top_sim, top_text = sim.topk(k_texts, dim=1)  # (Ni, k)
    per_chunk = max(1, chunk // k_texts)
    for start in range(0, n_images, per_chunk):
        images = torch.arange(start, min(start + per_chunk, n_images), device=sim.device)
        image_kv = model.qformer.encoder_key_values(image_embeds[images])  # once per image
        rows = torch.arange(len(images), device=sim.device).repeat_interleave(k_texts)
        texts = top_text[images].reshape(-1)
        itm = itm_match_logits(model, expand_key_values(image_kv, rows), input_ids[texts], attention_mask[texts])
        i2t[images[rows], texts] = itm + top_sim[images].reshape(-1)

    t2i = torch.full_like(sim.t(), -100.0)
    k_images = min(k, n_images)
    top_sim, top_image = sim.t().topk(k_images, dim=1)  # (Nt, k)
    for start in range(0, n_texts, per_chunk):
        texts = torch.arange(start, min(start + per_chunk, n_texts), device=sim.device)
        images = top_image[texts].reshape(-1)
        rows = texts.repeat_interleave(k_images)
        image_kv = model.qformer.encoder_key_values(image_embeds[images])
        itm = itm_match_logits(model, image_kv, input_ids[rows], attention_mask[rows])
        t2i[rows, images] = itm + top_sim[texts].reshape(-1)
    return i2t, t2i


def retrieval_recall(
    i2t: Tensor, t2i: Tensor, text_to_image: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K in percent. An image is retrieved right when any of its captions ranks in the
    top K (``txt_r``); a caption when its image does (``img_r``)."""
    images = torch.arange(i2t.shape[0], device=i2t.device)
    text_to_image = text_to_image.to(i2t.device)
    hits_i2t = text_to_image[i2t.argsort(dim=1, descending=True)] == images[:, None]  # (Ni, Nt)
    hits_t2i = t2i.argsort(dim=1, descending=True) == text_to_image[:, None]  # (Nt, Ni)
    rank_i2t = hits_i2t.float().argmax(dim=1)  # first hit; an image without captions never hits
    rank_t2i = hits_t2i.float().argmax(dim=1)
    has_caption = hits_i2t.any(dim=1)
    metrics = {}
    for k in ks:
        metrics[f"txt_r{k}"] = 100.0 * ((rank_i2t < k) & has_caption).float().mean().item()
        metrics[f"img_r{k}"] = 100.0 * (rank_t2i < k).float().mean().item()
    metrics["txt_r_mean"] = sum(metrics[f"txt_r{k}"] for k in ks) / len(ks)
    metrics["img_r_mean"] = sum(metrics[f"img_r{k}"] for k in ks) / len(ks)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


@torch.no_grad()
def caption_images(
    model: Blip2Stage1,
    image_embeds: Tensor,
    eos_token_id: int,
    pad_token_id: int | None = None,
    options: DecodingOptions = DecodingOptions(num_beams=3, max_new_tokens=30),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Caption token ids (B, L) from a stage-1 model's Q-Former alone (``[DEC]`` prompt), as
    LAVIS's ``Blip2Qformer.generate`` (beam search, 3 beams) does."""
    image_kv = model.qformer.encoder_key_values(image_embeds)
    queries = model.queries(image_embeds.shape[0])
    return qformer_generate(model.qformer, queries, image_kv, eos_token_id, pad_token_id, options, generator)
