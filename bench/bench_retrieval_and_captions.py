"""Stage-1 inference benchmarks: retrieval (ITC top k re-ranked by ITM) and Q-Former-only captions.

retrieval_rerank: ours is :func:`qformer.retrieval.retrieval_scores` (each image's cross-attention
K/V computed once for all its candidate pairs, a pair that is a candidate both ways scored once);
the reference is LAVIS's ``compute_sim_matrix``: the same ITC features and top k, then ITM on every
(image, text) candidate of i2t and of t2i with the image K/V recomputed from the image features
for every pair. Both batch the pairs alike (``CHUNK`` pairs a pass; LAVIS runs k a pass), so the
figure measures the shared K/V, not batching. The rankings must be identical.

qformer_caption: ours is :func:`qformer.retrieval.caption_images` (transformers' beam search over
the Q-Former's KV cache, the queries run once per image, one token a step); the reference is
LAVIS's ``Blip2Qformer.generate`` (:class:`FullPassDecoder`): the same beam search with a full
pass over [queries; [DEC] + text so far] of every beam row per new token, the image K/V projected
again each time. Tokens must be identical.

FLOPs are counted by :mod:`qformer.flops`'s formulas (forward matmul FLOPs; norms, softmax and
activations left out); ``tests/test_bench_flops.py`` checks these sums against
``torch.utils.flop_counter`` on both sides.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from harness import Result, max_abs_diff, time_alternately
from torch import Tensor
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from qformer.config import Blip2Stage1Config, QFormerConfig
from qformer.flops import image_key_values, matmul, qformer_pass
from qformer.generate import DecodingOptions, QFormerDecoder, pad_after_eos
from qformer.pretrained.qformer import QFormer
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.retrieval import caption_images, retrieval_scores

CHUNK = 32  # pairs (images, texts) a pass, both sides
IMAGE_TOKENS, IMAGE_WIDTH, QUERIES, TEXT_LENGTH = 257, 1408, 32, 32  # BLIP-2 with EVA ViT-g; max_txt_len
EOS = 102  # [SEP]


def retrieval_flops(config: Blip2Stage1Config, n_images: int, n_texts: int, pairs: int, shared_kv: bool) -> int:
    """Forward FLOPs (:mod:`qformer.flops`) of ITC features, similarity and the ITM re-rank of
    ``pairs`` pairs; the image K/V once per image in the re-rank when ``shared_kv``, once per
    pair otherwise."""
    q, d, e = config.num_query_tokens, config.qformer.hidden_size, config.embed_dim
    qformer = config.qformer
    itc = (qformer_pass(qformer, n_images, queries=q, image_tokens=IMAGE_TOKENS) + matmul(n_images * q, d, e)
           + qformer_pass(qformer, n_texts, text=TEXT_LENGTH) + matmul(n_texts, d, e)
           + matmul(n_images * q, e, n_texts))
    itm = (qformer_pass(qformer, pairs, queries=q, text=TEXT_LENGTH, image_tokens=IMAGE_TOKENS, project_image=False)
           + matmul(pairs * q, d, 2))
    kv = image_key_values(qformer, n_images if shared_kv else pairs, IMAGE_TOKENS)
    return (itc + itm + kv).forward


def stage1_model(layers: int, seed: int = 0) -> Blip2Stage1:
    """BLIP-2's stage-1 model (768 wide, 32 queries, BERT vocabulary) with ``layers`` layers,
    random weights, image features precomputed (no ViT)."""
    torch.manual_seed(seed)
    config = Blip2Stage1Config(vision=None, qformer=QFormerConfig(num_hidden_layers=layers))
    return Blip2Stage1(config).eval().requires_grad_(False)


def image_embeds(n: int, seed: int) -> Tensor:
    """(n, 257, 1408) random image encoder outputs (as if from EVA ViT-g)."""
    return torch.randn(n, IMAGE_TOKENS, IMAGE_WIDTH, generator=torch.Generator().manual_seed(seed))


def texts(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(n, 32) random token ids, [CLS] first, right-padded to random lengths 8..32, and their mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, TEXT_LENGTH), generator=gen)
    ids[:, 0] = 101
    lengths = torch.randint(8, TEXT_LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def reference_retrieval(
    model: Blip2Stage1, embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """LAVIS's ``compute_sim_matrix`` from image features: ITC similarity; for every image its
    top-k texts and for every text its top-k images re-scored with ITM logit + ITC similarity,
    every pair's image K/V recomputed (``encoder_hidden_states``); the rest -100."""
    qformer, q = model.qformer, model.num_query_tokens
    image_feats = torch.cat([
        model.image_features(qformer(query_embeds=model.queries(len(e)), encoder_hidden_states=e).last_hidden_state)
        for e in embeds.split(CHUNK)
    ])  # (Ni, Q, E)
    text_feats = torch.cat([
        model.text_features(qformer(input_ids=i, attention_mask=m).last_hidden_state)
        for i, m in zip(input_ids.split(CHUNK), attention_mask.split(CHUNK))
    ])  # (Nt, E)
    sim = model.similarity(image_feats, text_feats)  # (Ni, Nt)

    def itm(images: Tensor, texts: Tensor) -> Tensor:  # (N,) pairs -> (N,) match logits
        logits = []
        for i, t in zip(images.split(CHUNK), texts.split(CHUNK)):
            mask = torch.cat([attention_mask.new_ones(len(t), q), attention_mask[t]], dim=1)
            hidden = qformer(input_ids=input_ids[t], attention_mask=mask, query_embeds=model.queries(len(t)),
                             encoder_hidden_states=embeds[i]).last_hidden_state
            logits.append(model.itm_logits(hidden)[:, 1])
        return torch.cat(logits)

    i2t, t2i = torch.full_like(sim, -100.0), torch.full_like(sim.t(), -100.0)
    top_sim, top_text = sim.topk(min(k, sim.shape[1]), dim=1)  # (Ni, k)
    images = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(top_text.shape[1])
    i2t[images, top_text.reshape(-1)] = itm(images, top_text.reshape(-1)) + top_sim.reshape(-1)
    top_sim, top_image = sim.t().topk(min(k, sim.shape[0]), dim=1)  # (Nt, k)
    text_rows = torch.arange(sim.shape[1], device=sim.device).repeat_interleave(top_image.shape[1])
    t2i[text_rows, top_image.reshape(-1)] = itm(top_image.reshape(-1), text_rows) + top_sim.reshape(-1)
    return i2t, t2i


def ranking(scores: Tensor, k: int) -> Tensor:
    """Each row's k best columns, best first: (N, k)."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def bench_retrieval_rerank(quick: bool, device: str) -> Result:
    """ITC top k + ITM re-rank, ours (shared image K/V) against LAVIS's per-pair recomputation."""
    layers, n_images, n_texts, k, rounds = (4, 4, 16, 2, 2) if quick else (12, 10, 50, 4, 2)
    model = stage1_model(layers).to(device)
    embeds = model.ln_vision(image_embeds(n_images, seed=1).to(device))
    ids, mask = (t.to(device) for t in texts(n_texts, seed=2))

    def ours() -> tuple[Tensor, Tensor]:
        return retrieval_scores(model, embeds, ids, mask, k=k, chunk=CHUNK)

    def ref() -> tuple[Tensor, Tensor]:
        return reference_retrieval(model, embeds, ids, mask, k)

    (i2t, t2i), (ref_i2t, ref_t2i) = ours(), ref()  # the check is the warm-up
    for mine, theirs in ((i2t, ref_i2t), (t2i, ref_t2i)):
        assert torch.equal(ranking(mine, k), ranking(theirs, k)), "retrieval rankings differ"
        assert torch.equal(mine == -100.0, theirs == -100.0), "re-ranked candidates differ"
    diff = max(max_abs_diff(i2t, ref_i2t), max_abs_diff(t2i, ref_t2i))
    assert diff < 1e-4, f"re-rank scores differ by {diff}"
    k_texts, k_images = min(k, n_texts), min(k, n_images)
    pairs = n_images * k_texts + n_texts * k_images
    unique = int(((i2t > -100.0) | (t2i.t() > -100.0)).sum())
    config = model.config
    limit = retrieval_flops(config, n_images, n_texts, pairs, False) / retrieval_flops(
        config, n_images, n_texts, unique, True)
    result = Result("retrieval_rerank", max_abs_diff=diff, limit=limit, extra={
        "images": n_images, "texts": n_texts, "k": k, "layers": layers, "itm_pairs": pairs, "unique_pairs": unique,
        "pairs_a_pass": CHUNK, "tolerance": "identical top-k rankings; scores within 1e-4",
        "target": "identical ranking; speedup >= 0.9 x limit",
        "full_size_note": None if quick else "reduced from 200 images x 1000 texts, k=16 (19200 ITM pairs, about "
                                             "an hour a side on 2 cores) to fit ~5 minutes a side",
    })
    return time_alternately(ours, ref, rounds, device, warmup=0).into(result)


class FullPassDecoder(QFormerDecoder):
    """LAVIS's ``Blip2Qformer.generate`` with transformers' beam search: every step one full
    pass over [queries; [DEC] + text so far] of every beam row, the image keys/values projected
    again from the image embeddings repeated per beam (LAVIS's BERT fork gets no cache back
    under the names it reads)."""

    def __init__(self, qformer: QFormer, eos_token_id: int, queries: Tensor, embeds: Tensor) -> None:
        super().__init__(qformer, eos_token_id)
        self.queries, self.embeds = queries, embeds  # (B x nb, Q, D), (B x nb, S, W)

    def forward(self, input_ids: Tensor, use_cache: bool = False, return_dict: bool = True) -> CausalLMOutputWithPast:
        out = self.qformer(input_ids=input_ids, query_embeds=self.queries, encoder_hidden_states=self.embeds,
                           is_decoder=True)
        return CausalLMOutputWithPast(logits=out.logits)


@torch.no_grad()
def reference_caption(model: Blip2Stage1, embeds: Tensor, options: DecodingOptions) -> Tensor:
    """Captions (B, L) as LAVIS decodes them (:class:`FullPassDecoder`), padded after eos as ours."""
    qformer, beams, batch = model.qformer, options.num_beams, embeds.shape[0]
    decoder = FullPassDecoder(qformer, EOS, model.queries(batch * beams), embeds.repeat_interleave(beams, dim=0))
    start = torch.full((batch, 1), qformer.config.bos_token_id, dtype=torch.long, device=embeds.device)
    generation = GenerationConfig(**asdict(options), use_cache=False, bos_token_id=qformer.config.bos_token_id,
                                  eos_token_id=EOS, pad_token_id=qformer.config.pad_token_id)
    return pad_after_eos(decoder.generate(input_ids=start, generation_config=generation)[:, 1:], EOS,
                         qformer.config.pad_token_id)


def caption_flops(config: QFormerConfig, batch: int, beams: int, steps: int, cached: bool) -> int:
    """Forward FLOPs (:mod:`qformer.flops`) of beam-search captioning. Cached: the image K/V and
    one query pass per image, then per step the new token of every beam row through every layer
    against the cache and the LM head on it. LAVIS's: per step a full pass of every beam row over
    queries + the text so far, its image K/V projected again, the LM head on every text
    position. Beam bookkeeping is left out."""
    rows = batch * beams
    if cached:
        total = image_key_values(config, batch, IMAGE_TOKENS)
        total = total + qformer_pass(config, batch, queries=QUERIES, image_tokens=IMAGE_TOKENS, project_image=False)
        for step in range(steps):  # the new token attends to Q + step cached positions and itself
            total = total + qformer_pass(config, rows, text=1, past=QUERIES + step, lm_head=True)
        return total.forward
    total = image_key_values(config, rows, IMAGE_TOKENS) * steps
    for step in range(steps):
        total = total + qformer_pass(config, rows, queries=QUERIES, text=step + 1, image_tokens=IMAGE_TOKENS,
                                     project_image=False, lm_head=True)
    return total.forward


def bench_qformer_caption(quick: bool, device: str) -> Result:
    """Q-Former-only beam-search captions, KV cache against a full pass per token."""
    layers, batch, steps, rounds = (4, 2, 8, 2) if quick else (12, 8, 30, 2)
    options = DecodingOptions(num_beams=3, max_new_tokens=steps)
    model = stage1_model(layers, seed=3).to(device)
    embeds = model.ln_vision(image_embeds(batch, seed=4).to(device))

    def ours() -> Tensor:
        return caption_images(model, embeds, EOS, options=options)

    def ref() -> Tensor:
        return reference_caption(model, embeds, options)

    mine, theirs = ours(), ref()  # the check is the warm-up
    assert torch.equal(mine, theirs), f"captions differ:\n{mine}\n{theirs}"
    config = model.config.qformer
    limit = caption_flops(config, batch, 3, steps, False) / caption_flops(config, batch, 3, steps, True)
    result = Result("qformer_caption", max_abs_diff=0.0, limit=limit, extra={
        "batch": batch, "beams": 3, "new_tokens": steps, "layers": layers, "vocab": config.vocab_size,
        "generated_tokens": int(mine.shape[1]), "tolerance": "identical tokens", "target": "speedup >= 3",
    })
    return time_alternately(ours, ref, rounds, device, warmup=0).into(result)


BENCHMARKS = {"retrieval_rerank": bench_retrieval_rerank, "qformer_caption": bench_qformer_caption}
