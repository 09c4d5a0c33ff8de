"""Decoding with the Q-Former's own LM head (BLIP-2 stage-1 captioning)."""

from __future__ import annotations

import torch
from torch import Tensor

from qformer.models.qformer import QFormer


@torch.no_grad()
def qformer_greedy_decode(
    model: QFormer,
    query_embeds: Tensor,
    encoder_hidden_states: Tensor,
    eos_token_id: int,
    pad_token_id: int | None = None,
    max_new_tokens: int = 30,
    encoder_attention_mask: Tensor | None = None,
) -> Tensor:
    """Greedy captions (B, <= max_new_tokens) after the ``[DEC]`` bos, eos included, padded.

    The queries read the image once (cached); each step then feeds one token through the
    cached self-attention, as BLIP-2's ITG is trained.
    """
    bos = model.config.bos_token_id
    if bos is None:
        raise ValueError("the Q-Former config has no bos_token_id ([DEC])")
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    cache = model(
        query_embeds=query_embeds,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
        use_cache=True,
    ).past_key_values
    batch = query_embeds.shape[0]
    token = torch.full((batch, 1), bos, dtype=torch.long, device=query_embeds.device)  # (B, 1)
    finished = torch.zeros(batch, dtype=torch.bool, device=query_embeds.device)
    generated = []
    for _ in range(max_new_tokens):
        step = model(input_ids=token, past_key_values=cache, is_decoder=True, use_cache=True)
        cache = step.past_key_values
        token = step.logits[:, -1].argmax(-1, keepdim=True).masked_fill(finished[:, None], pad)  # (B, 1)
        generated.append(token)
        finished |= token[:, 0] == eos_token_id
        if bool(finished.all()):
            break
    return torch.cat(generated, dim=1)
