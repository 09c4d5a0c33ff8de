"""Stage-1 tasks over many images and texts: image-text retrieval (ITC candidates re-ranked by
ITM) and its recall@K, captions from the Q-Former alone, search over a folder. Features and
scores of single inputs are :mod:`qformer.pretrained.stage1`'s."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from qformer.data.image_files import batches, expand_images
from qformer.data.transforms import eval_image
from qformer.generate import DecodingOptions, qformer_generate
from qformer.models.blip2 import expand_key_values
from qformer.pretrained.stage1 import Blip2Stage1, Images, Texts, extract_features, image_embeds_of, tokenize

RERANK_DEPTH = 128  # BLIP-2's k: the ITC candidates re-ranked by ITM


@torch.no_grad()
def itm_match_logits(
    model: Blip2Stage1, image_kv: tuple, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """The ITM "match" logit of each (image, text) row: (N,)."""
    hidden = model.multimodal_pass(input_ids, attention_mask, image_kv).last_hidden_state
    return model.itm_logits(hidden)[:, 1]


@dataclass
class Candidates:
    """The pairs BLIP-2's retrieval re-ranks, picked by the ITC similarity ``sim``: each image's
    best texts (``top_text``) and each text's best images (``top_image``). ``image_of`` /
    ``text_of`` list every such pair once, sorted by image then text (a pair that is a candidate
    both ways is scored once); ``inverse`` maps the i2t pairs, then the t2i pairs, onto them."""

    sim: Tensor  # (Ni, Nt)
    top_text: Tensor  # (Ni, kt)
    top_image: Tensor  # (Nt, ki)
    image_of: Tensor  # (P,)
    text_of: Tensor  # (P,)
    inverse: Tensor  # (Ni * kt + Nt * ki,)

    def pairs(self) -> tuple[Tensor, Tensor]:
        """The image and the text of each i2t pair, then of each t2i pair."""
        return _candidate_pairs(self.top_text, self.top_image)

    def pairs_of_images(self, first: int, last: int) -> tuple[int, int]:
        """The range of ``image_of`` whose image is in [first, last)."""
        bounds = torch.tensor([first, last], device=self.image_of.device)
        lo, hi = torch.searchsorted(self.image_of, bounds).tolist()
        return lo, hi


def _candidate_pairs(top_text: Tensor, top_image: Tensor) -> tuple[Tensor, Tensor]:
    """(image, text) of each i2t pair, then of each t2i pair: (Ni * kt + Nt * ki,) each."""
    (n_images, k_texts), (n_texts, k_images) = top_text.shape, top_image.shape
    images = torch.arange(n_images, device=top_text.device).repeat_interleave(k_texts)  # (Ni * kt,)
    texts = torch.arange(n_texts, device=top_image.device).repeat_interleave(k_images)  # (Nt * ki,)
    return torch.cat([images, top_image.reshape(-1)]), torch.cat([top_text.reshape(-1), texts])


def rerank_candidates(sim: Tensor, k: int = RERANK_DEPTH) -> Candidates:
    """The ``k`` best texts of every image and the ``k`` best images of every text by ITC
    similarity ``sim`` (Ni, Nt): the pairs ITM re-scores."""
    n_images, n_texts = sim.shape
    top_text = sim.topk(min(k, n_texts), dim=1).indices  # (Ni, kt)
    top_image = sim.t().topk(min(k, n_images), dim=1).indices  # (Nt, ki)
    pair_image, pair_text = _candidate_pairs(top_text, top_image)
    unique, inverse = torch.unique(pair_image * n_texts + pair_text, return_inverse=True)  # sorted: by image
    return Candidates(sim, top_text, top_image, unique // n_texts, unique % n_texts, inverse)


def similarity_rows(model: Blip2Stage1, image_feats: Iterable[Tensor], text_feats: Tensor) -> Tensor:
    """:meth:`Blip2Stage1.similarity` a block of images at a time (each block's (B, Nt, Q)
    products, not all images' at once): blocks of (B, Q, E) x (Nt, E) -> (Ni, Nt)."""
    return torch.cat([model.similarity(block, text_feats) for block in image_feats])


@torch.no_grad()
def itm_of_images(
    model: Blip2Stage1,
    image_embeds: Tensor,
    first: int,
    candidates: Candidates,
    input_ids: Tensor,
    attention_mask: Tensor,
    chunk: int = 32,
) -> Tensor:
    """The ITM match logits (float32) of the candidate pairs whose image is one of
    ``image_embeds`` (B, S, W): images ``first`` to ``first + B``, in ``candidates``' order.
    ``chunk`` images' cross-attention keys/values are computed once for all their texts; the
    pairs go ``chunk`` at a time."""
    logits = [torch.empty(0, device=image_embeds.device)]
    for start in range(0, image_embeds.shape[0], chunk):
        block = image_embeds[start : start + chunk]
        lo, hi = candidates.pairs_of_images(first + start, first + start + block.shape[0])
        image_kv = model.qformer.encoder_key_values(block)  # once per image
        for pair in range(lo, hi, chunk):
            rows = slice(pair, min(pair + chunk, hi))
            kv = expand_key_values(image_kv, candidates.image_of[rows] - first - start)
            texts = candidates.text_of[rows]
            logits.append(itm_match_logits(model, kv, input_ids[texts], attention_mask[texts]).float())
    return torch.cat(logits)


def reranked_scores(candidates: Candidates, itm: Tensor) -> tuple[Tensor, Tensor]:
    """i2t (Ni, Nt) and t2i (Nt, Ni): ITM logit + ITC similarity for the candidates (``itm``: one
    logit per ``image_of`` pair), -100 elsewhere."""
    sim = candidates.sim
    pair_image, pair_text = candidates.pairs()
    scores = itm.to(sim.device)[candidates.inverse] + sim[pair_image, pair_text]  # (Ni * kt + Nt * ki,)
    i2t = torch.full_like(sim, -100.0)
    t2i = torch.full_like(sim.t(), -100.0)
    split = candidates.top_text.numel()
    i2t[pair_image[:split], pair_text[:split]] = scores[:split].to(sim.dtype)
    t2i[pair_text[split:], pair_image[split:]] = scores[split:].to(sim.dtype)
    return i2t, t2i


@torch.no_grad()
def retrieval_scores(
    model: Blip2Stage1,
    image_embeds: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    k: int = RERANK_DEPTH,
    chunk: int = 32,
) -> tuple[Tensor, Tensor]:
    """BLIP-2's retrieval scores: the ITC similarity ranks all pairs; the top ``k`` candidates
    of every image (text) are re-scored with ITM logit + ITC similarity; the rest get -100.

    image_embeds (Ni, S, W) after ``ln_vision``; texts (Nt, T). Returns i2t (Ni, Nt), t2i (Nt, Ni).
    The ITM passes of both directions go ``chunk`` pairs at a time, grouped by image (see
    :func:`itm_of_images`). Everything is held in memory; ``qformer eval --task coco_retrieval``
    (:mod:`qformer.evaluate.retrieval_tasks`) keeps features on disk, resumes and spreads over ranks.
    """
    n_images, n_texts = image_embeds.shape[0], input_ids.shape[0]
    text_feats = torch.cat([
        extract_features(model, input_ids=input_ids[i : i + chunk], attention_mask=attention_mask[i : i + chunk]).text
        for i in range(0, n_texts, chunk)
    ])  # (Nt, E)
    image_feats = (extract_features(model, image_embeds[i : i + chunk]).image for i in range(0, n_images, chunk))
    candidates = rerank_candidates(similarity_rows(model, image_feats, text_feats), k)
    itm = itm_of_images(model, image_embeds, 0, candidates, input_ids, attention_mask, chunk)
    return reranked_scores(candidates, itm)


def check_rerank_depth(k: int, texts: int, images: int, ks: tuple[int, ...] = (1, 5, 10)) -> None:
    """Refuse a re-ranking depth ``k`` too shallow for recall@max(ks) over ``texts`` captions and
    ``images`` images; callers check it before computing anything. Recall@K needs the top K
    ranked (or every candidate, when there are fewer than K); below rank k the scores tie."""
    for name, count in (("texts", texts), ("images", images)):
        need = min(max(ks), count)
        if k < need:
            raise ValueError(f"k = {k} is too shallow: recall@{max(ks)} ranks the top {need} {name} (of {count}), "
                             f"so it needs k >= {need}; below rank k the {name} tie at -100 (BLIP-2 uses "
                             f"k = {RERANK_DEPTH})")


def retrieval_recall(
    i2t: Tensor, t2i: Tensor, text_to_image: Tensor, ks: tuple[int, ...] = (1, 5, 10), k: int | None = None
) -> dict[str, float]:
    """Recall@K in percent. An image is retrieved right when any of its captions ranks in the
    top K (``txt_r``); a caption when its image does (``img_r``). ``k``: the re-ranking depth of
    :func:`retrieval_scores`, whose scores below rank k all tie at -100; a K above it would
    depend on the order of those ties, so it is refused."""
    if k is not None:
        check_rerank_depth(k, i2t.shape[1], t2i.shape[1], ks)
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


# LAVIS's Blip2Qformer.generate: 3 beams, max_length 30 and min_length 10 counting [DEC], top_p 0.9 if sampling
LAVIS_CAPTIONS = DecodingOptions(num_beams=3, max_new_tokens=29, min_new_tokens=9, top_p=0.9)


@torch.no_grad()
def caption_images(
    model: Blip2Stage1,
    image_embeds: Tensor,
    eos_token_id: int,
    pad_token_id: int | None = None,
    options: DecodingOptions = LAVIS_CAPTIONS,
    **generate_kwargs,
) -> Tensor:
    """Caption token ids (B, L) from a stage-1 model's Q-Former alone (``[DEC]`` prompt), as
    LAVIS's ``Blip2Qformer.generate`` decodes them (its settings by default).
    ``generate_kwargs``: any other option of transformers' ``generate`` (see :func:`qformer_generate`)."""
    image_kv = model.qformer.encoder_key_values(image_embeds)
    queries = model.queries(image_embeds.shape[0])
    return qformer_generate(model.qformer, queries, image_kv, eos_token_id, pad_token_id, options, **generate_kwargs)


def caption_texts(model: Blip2Stage1, images: Images, **generation) -> list[str]:
    """Captions of images as users have them (see :func:`image_embeds_of`) by the Q-Former
    alone, decoded with the model's tokenizer ([SEP] ends a caption, as in LAVIS).
    ``generation``: ``num_beams``, ``max_new_tokens`` or any option of :func:`qformer_generate`
    (LAVIS's settings by default)."""
    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.sep_token_id is None:
        raise ValueError("captions need the stage-1 model's BERT tokenizer (with [SEP]): set model.tokenizer")
    tokens = caption_images(model, image_embeds_of(model, images), tokenizer.sep_token_id, tokenizer.pad_token_id,
                            **generation)
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


@dataclass
class SearchResult:
    """Per query, the best images first with their scores (ITM logit + ITC similarity, as
    :func:`retrieval_scores`); and one message per image (or argument) that could not be read."""

    queries: list[str]
    matches: list[list[tuple[str, float]]]  # one list per query: (image, score), best first
    skipped: list[str] = field(default_factory=list)


def read_pixels(model: Blip2Stage1, names: Sequence[str], skipped: list[str]) -> tuple[list[str], Tensor | None]:
    """The readable images of ``names`` and their pixels (B, 3, S, S); the others noted in ``skipped``."""
    kept, pixels = [], []
    for name in names:
        try:
            pixels.append(eval_image(name, model.config.image))
            kept.append(name)
        except ValueError as err:
            skipped.append(str(err))
    return kept, (torch.stack(pixels) if pixels else None)


def check_search_options(top: int, k: int, batch_size: int) -> None:
    """:func:`search`'s numbers, checked (the CLI checks them before the model loads)."""
    for name, value in (("top", top), ("k", k), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if top > k:
        raise ValueError(f"top ({top}) must not exceed k ({k}): only the k ITC candidates are re-ranked")


@torch.no_grad()
def search(
    model: Blip2Stage1,
    images: str | Path | Sequence[str | Path],
    queries: Texts,
    top: int = 10,
    k: int = RERANK_DEPTH,
    batch_size: int = 32,
) -> SearchResult:
    """The images (a folder, a glob, files, or a list of them) that best match each query, as
    BLIP-2 retrieves: every image's ITC similarity ranks them, the ``k`` best are re-scored
    with ITM logit + ITC similarity and the ``top`` of those returned. Images are encoded
    ``batch_size`` at a time, holding only their features (the ``k`` candidates are read again
    for ITM); unreadable files are skipped and named in ``SearchResult.skipped``."""
    check_search_options(top, k, batch_size)
    queries = [queries] if isinstance(queries, str) else list(queries)
    arguments = [str(images)] if isinstance(images, (str, Path)) else [str(image) for image in images]
    paths, skipped = expand_images(arguments)
    input_ids, attention_mask = tokenize(model, queries)
    text_feats = extract_features(model, input_ids=input_ids, attention_mask=attention_mask).text  # (Nq, E)

    readable, image_feats = [], []
    for names in batches(paths, batch_size):
        kept, pixels = read_pixels(model, names, skipped)
        if kept:
            image_feats.append(extract_features(model, image_embeds_of(model, pixels)).image)  # (B, Q, E)
            readable += kept
    if not readable:
        raise ValueError(f"no readable image among {', '.join(arguments)}")
    sim = model.similarity(torch.cat(image_feats), text_feats).t()  # (Nq, Ni)
    scores, candidates = sim.topk(min(k, len(readable)), dim=1)  # (Nq, k)

    for chunk in batches(sorted(set(candidates.flatten().tolist())), batch_size):
        image_kv = model.qformer.encoder_key_values(image_embeds_of(model, [readable[i] for i in chunk]))
        chosen = torch.as_tensor(chunk, device=candidates.device)
        query, slot = torch.isin(candidates, chosen).nonzero(as_tuple=True)  # the pairs this chunk scores
        rows = torch.searchsorted(chosen, candidates[query, slot])  # each pair's image within the chunk
        itm = itm_match_logits(model, expand_key_values(image_kv, rows), input_ids[query], attention_mask[query])
        scores[query, slot] += itm.to(scores.dtype)

    matches = []
    for row in range(len(text_feats)):
        order = scores[row].argsort(descending=True)[:top]
        matches.append([(readable[int(candidates[row, j])], float(scores[row, j])) for j in order])
    return SearchResult(queries, matches, skipped)
