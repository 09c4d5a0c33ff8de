"""Decoding with the Q-Former's own LM head (BLIP-2 stage-1 captioning).

The queries read the image once; every step then feeds one token through the cached
self-attention, as ITG is trained. Beams share their image's query pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qformer.inputs import check_positions
from qformer.models.qformer import QFormer


@dataclass
class DecodingOptions:
    """Greedy (``num_beams=1``), beam search, or nucleus sampling (``do_sample``)."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling draws one sequence per image: use num_beams=1 with do_sample")
        if self.repetition_penalty <= 0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("repetition_penalty and temperature must be > 0, top_p in (0, 1]")


def _penalise_repeats(logits: Tensor, generated: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty on tokens already generated (B, V)."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return logits
    seen = logits.gather(1, generated)
    return logits.scatter(1, generated, torch.where(seen > 0, seen / penalty, seen * penalty))


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@torch.no_grad()
def qformer_generate(
    model: QFormer,
    query_embeds: Tensor,
    image_key_values: tuple,
    eos_token_id: int,
    pad_token_id: int | None = None,
    options: DecodingOptions = DecodingOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Captions (B, <= max_new_tokens) after the ``[DEC]`` bos, eos included, then padding.

    query_embeds (B, Q, D); ``image_key_values`` from :meth:`QFormer.encoder_key_values`.
    """
    bos = model.config.bos_token_id
    if bos is None:
        raise ValueError("the Q-Former config has no bos_token_id ([DEC])")
    check_positions(f"max_new_tokens={options.max_new_tokens} ([DEC] first)", options.max_new_tokens,
                    model.config.max_position_embeddings, "the Q-Former's position table (max_position_embeddings)",
                    "generate fewer tokens")
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    batch, beams, device = query_embeds.shape[0], options.num_beams, query_embeds.device
    cache = model(query_embeds=query_embeds, encoder_key_values=image_key_values, use_cache=True).past_key_values
    rows = torch.arange(batch, device=device).repeat_interleave(beams)  # (B * nb,)
    cache = cache.index_select(rows)
    generated = torch.empty(batch * beams, 0, dtype=torch.long, device=device)
    token = torch.full((batch * beams, 1), bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch * beams, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")  # the first step expands beam 0 only
    lengths = torch.zeros(batch * beams, device=device)
    for step in range(options.max_new_tokens):
        out = model(input_ids=token, past_key_values=cache, is_decoder=True, use_cache=True)
        cache = out.past_key_values
        logits = _penalise_repeats(out.logits[:, -1].float(), generated, options.repetition_penalty)  # (B*nb, V)
        if step < options.min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        if options.do_sample:
            logits = _top_p_filter(logits / options.temperature, options.top_p)
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        elif beams == 1:
            next_token = logits.argmax(-1)
        else:
            logprobs = logits.log_softmax(-1)
            logprobs[finished] = float("-inf")
            logprobs[finished, pad] = 0.0  # a finished beam only extends with padding, at no cost
            vocab = logprobs.shape[-1]
            candidates = (scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
            scores, flat = candidates.topk(beams, dim=1)  # (B, nb)
            source = (flat // vocab + torch.arange(batch, device=device)[:, None] * beams).view(-1)  # (B*nb,)
            next_token = (flat % vocab).view(-1)
            generated, finished, lengths = generated[source], finished[source], lengths[source]
            cache = cache.index_select(source)
        next_token = next_token.masked_fill(finished, pad)
        lengths = lengths + (~finished).float()
        generated = torch.cat([generated, next_token[:, None]], dim=1)
        finished = finished | (next_token == eos_token_id)
        token = next_token[:, None]
        if bool(finished.all()):
            break
    if beams == 1:
        return generated
    normalised = scores / lengths.view(batch, beams).clamp(min=1) ** options.length_penalty  # (B, nb)
    best = normalised.argmax(dim=1) + torch.arange(batch, device=device) * beams
    return generated[best]
