"""Candidate ranking as InstructBLIP evaluates its multiple-choice and classification sets: the LLM
scores each candidate answer by its log-likelihood given the image and the prompt, and the
prediction is the best candidate.

The rule is LAVIS's ``_predict_class`` (``lavis/models/blip2_models/blip2_t5_instruct.py`` and
``blip2_vicuna_instruct.py``): a candidate's score is the sum of its tokens' log-probabilities.
Its FlanT5 sums the per-token losses (``reduction="none"`` then ``.sum(1)`` in LAVIS's
``modeling_t5.py``); its Vicuna takes their mean over the whole padded row (``.mean(1)`` in
``modeling_llama.py``), a division by a length shared by every candidate of a question, which
ranks as the sum does. So there is no length normalisation: a longer candidate pays for each of
its tokens. A candidate's tokens are what the LLM's tokenizer makes of it alone, less a leading
bos (LAVIS drops the first token of each Vicuna candidate; FlanT5's keep the eos its tokenizer
appends, and are scored with it).

Batched as the image side allows: the image, the Q-Former (which reads the prompt too for
InstructBLIP) and the LLM's prefix [queries; prompt] run once per question. A decoder-only LLM
keeps the prefix's cache and scores every candidate of the batch in one more forward over that
cache; an encoder-decoder LLM runs its encoder once per question and its decoder once over all
candidates, as labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qformer.models.blip2 import cache_argument, move_padding

RANKING_RULE = ("the candidate with the highest summed log-likelihood of its tokens given the image and the prompt "
                "(LAVIS's predict_class: no length normalisation)")


def candidate_tokens(tokenizer: Any, candidates: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Each candidate as the tokenizer encodes it alone, a leading bos dropped, right-padded:
    ids and mask (N, C)."""
    rows = []
    for text, ids in zip(candidates, tokenizer(list(candidates)).input_ids, strict=True):
        if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]:
            ids = ids[1:]
        if not ids:
            raise ValueError(f"candidate {text!r} has no tokens")
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


def _token_log_probs(logits: Tensor, ids: Tensor) -> Tensor:
    """log p(ids) under ``logits``: (N, C, V), (N, C) -> (N, C), in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _decoder_only(model: Any, queries: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, owner: Tensor,
                  ids: Tensor, mask: Tensor) -> Tensor:
    """Summed candidate log-likelihoods (N,) for a decoder-only LLM: the prefix [queries; prompt]
    once per question (left-padded, positions counted over real tokens), its cache then shared by
    that question's candidates."""
    language_model = model.language_model
    prompt_ids, prompt_mask = move_padding(prompt_ids, prompt_mask, "left")
    embeds, prefix_mask = model._inputs_embeds(queries, prompt_ids, prompt_mask)  # (B, P, H), (B, P)
    positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    key = cache_argument(language_model)
    prefix = language_model(inputs_embeds=embeds, attention_mask=prefix_mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1)
    first = _token_log_probs(prefix.logits[:, -1:][owner], ids[:, :1])  # (N, 1): each candidate's first token
    if ids.shape[1] == 1:
        return (first * mask).sum(-1)
    cache = prefix[key]
    cache.batch_select_indices(owner)  # (N, ...): each candidate row over its question's prefix
    lengths = prefix_mask.sum(-1)[owner]  # (N,) real prefix tokens
    steps = torch.arange(ids.shape[1] - 1, device=ids.device)
    rest = language_model(input_ids=ids[:, :-1], attention_mask=torch.cat([prefix_mask[owner], mask[:, :-1]], dim=1),
                          position_ids=lengths[:, None] + steps, **{key: cache})
    return (torch.cat([first, _token_log_probs(rest.logits, ids[:, 1:])], dim=1) * mask).sum(-1)


def _encoder_decoder(model: Any, queries: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, owner: Tensor,
                     ids: Tensor, mask: Tensor) -> Tensor:
    """Summed candidate log-likelihoods (N,) for an encoder-decoder LLM: the encoder over
    [queries; prompt] once per question, the candidates as decoder labels."""
    from transformers.modeling_outputs import BaseModelOutput

    language_model = model.language_model
    prompt_ids, prompt_mask = move_padding(prompt_ids, prompt_mask, "right")
    embeds, encoder_mask = model._inputs_embeds(queries, prompt_ids, prompt_mask)  # (B, P, H), (B, P)
    hidden = language_model.get_encoder()(inputs_embeds=embeds, attention_mask=encoder_mask).last_hidden_state
    labels = ids.masked_fill(mask == 0, -100)
    out = language_model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[owner]),
                         attention_mask=encoder_mask[owner], decoder_attention_mask=mask,
                         decoder_input_ids=language_model.prepare_decoder_input_ids_from_labels(labels=labels))
    return (_token_log_probs(out.logits, ids) * mask).sum(-1)


@torch.no_grad()
def candidate_log_likelihoods(model: Any, images: Sequence[Any], prompts: Sequence[str],
                              candidates: Sequence[Sequence[str]]) -> list[list[float]]:
    """For each image, its prompt and its candidates: each candidate's summed token
    log-likelihood (see the module's docstring), in the candidates' order. ``model``: a
    :class:`~qformer.pretrained.stage2.Blip2` or InstructBLIP with its tokenizer."""
    if not len(images) == len(prompts) == len(candidates):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(candidates)} candidate lists")
    if any(not choices for choices in candidates):
        raise ValueError("every question needs at least one candidate")
    tokenizer = model._tokenizer()
    device = model.ln_vision.weight.device
    pixels = model.preprocess(images)
    queries = model.language_model_inputs(model.image_embeds(pixels), **model.instruction(prompts))  # (B, Q, H)
    text = tokenizer(list(prompts), padding=True, return_tensors="pt").to(device)
    counts = [len(choices) for choices in candidates]
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    ids, mask = (t.to(device) for t in candidate_tokens(tokenizer, [c for choices in candidates for c in choices]))
    score = _encoder_decoder if model.is_encoder_decoder else _decoder_only
    scores = score(model, queries, text.input_ids, text.attention_mask, owner, ids, mask).tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [scores[start : start + count] for start, count in zip(starts, counts)]
