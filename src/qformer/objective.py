"""BLIP-2's stage-1 objective: ITC + ITM (hard negatives) + ITG in one step.

Exact across processes: features are gathered with gradient and every mean is taken over the
global batch, so N processes with batch b give the loss and gradients of one process with
batch N*b (after DDP's gradient averaging). The image's cross-attention keys/values are
computed once and shared by the ITC query pass and the ITM pass; the ITG text pass reuses the
query pass's self-attention cache, as BLIP-2 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qformer.checks import check_batch, check_tokens
from qformer.collectives import Group, gather, gather_with_grad, rank_and_world
from qformer.losses import (
    IGNORE_INDEX,
    HardNegatives,
    causal_lm_loss,
    itc_loss,
    itm_loss,
    positives_mask,
    sample_hard_negatives,
)
from qformer.models.blip2 import Blip2Stage1Model, concat_key_values
from qformer.models.qformer import BlockKeyValue


@dataclass
class Stage1Output:
    loss: Tensor
    itc: Tensor
    itm: Tensor
    itg: Tensor
    sim_i2t: Tensor  # (B, N) local images x global texts, divided by the temperature
    sim_t2i: Tensor  # (B, N)
    negatives: HardNegatives


class Stage1Objective(nn.Module):
    """Wraps a :class:`Blip2Stage1Model` so that DDP/FSDP see one ``forward`` computing the losses.

    ``group`` is the process group the global batch spans (None: one process).
    """

    def __init__(self, model: Blip2Stage1Model, group: Group = None, itc_label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.group = group
        self.itc_label_smoothing = itc_label_smoothing

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        image_ids: Tensor | None = None,
        negatives: HardNegatives | None = None,
        generator: torch.Generator | None = None,
    ) -> Stage1Output:
        """One step on a batch of B image-text pairs.

        input_ids / attention_mask (B, T): the Q-Former tokenizer's output ([CLS] first, right
        padded). Images as pixels or precomputed encoder outputs (B, S, W). ``image_ids`` (B,)
        mark pairs of the same image (soft ITC targets, excluded from negatives). ``negatives``
        fixes the ITM negatives (global indices); otherwise they are sampled with ``generator``.
        """
        check_tokens(input_ids, attention_mask)
        check_batch(input_ids=input_ids, pixel_values=pixel_values, image_features=image_features, image_ids=image_ids)
        model, group = self.model, self.group
        rank, world = rank_and_world(group)
        batch = input_ids.shape[0]
        image_embeds = model.image_embeds(pixel_values, image_features)  # (B, S, W)
        image_kv = model.qformer.encoder_key_values(image_embeds)  # once per image, shared below

        query_out = model.query_pass(image_kv, use_cache=True)
        image_feats = model.image_features(query_out.last_hidden_state)  # (B, Q, E)
        text_feats = model.text_features(model.text_pass(input_ids, attention_mask).last_hidden_state)  # (B, E)

        # ITC: local rows against the global batch
        temperature = model.temperature()
        sim_i2t = model.similarity(image_feats, gather_with_grad(text_feats, group)) / temperature  # (B, N)
        sim_t2i = model.similarity(gather_with_grad(image_feats, group), text_feats).t() / temperature  # (B, N)
        global_ids = None if image_ids is None else gather(image_ids, group)
        positives = positives_mask(batch, sim_i2t.shape[1], rank * batch, image_ids, global_ids, sim_i2t.device)
        itc = itc_loss(sim_i2t, sim_t2i, positives, self.itc_label_smoothing, group)

        # ITM: text [pos, pos, neg] x image [pos, neg, pos]
        if negatives is None:
            negatives = sample_hard_negatives(sim_i2t, sim_t2i, positives, generator)
        if world == 1:  # every row reads this batch's images: their keys/values kept once
            itm_kv = tuple(None if kv is None else BlockKeyValue(*kv, (None, negatives.image, None)) for kv in image_kv)
        else:
            negative_embeds = gather_with_grad(image_embeds, group)[negatives.image]  # (B, S, W)
            itm_kv = concat_key_values(image_kv, model.qformer.encoder_key_values(negative_embeds), image_kv)
        negative_ids = gather(input_ids, group)[negatives.text]  # (B, T)
        negative_mask = gather(attention_mask, group)[negatives.text]
        multimodal = model.multimodal_pass(
            torch.cat([input_ids, input_ids, negative_ids]),
            torch.cat([attention_mask, attention_mask, negative_mask]),
            itm_kv,
        )
        itm = itm_loss(model.itm_logits(multimodal.last_hidden_state), negatives.valid, group)

        # ITG: [DEC] + caption, reading the cached query pass
        bos = model.qformer.config.bos_token_id
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = bos
        labels = decoder_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        query_mask = attention_mask.new_ones(batch, model.config.num_query_tokens)
        itg_out = model.qformer(
            input_ids=decoder_ids,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            past_key_values=query_out.past_key_values,
            is_decoder=True,
        )
        itg = causal_lm_loss(itg_out.logits, labels, model.qformer.config.lm_label_smoothing, group)
        return Stage1Output(itc + itm + itg, itc, itm, itg, sim_i2t, sim_t2i, negatives)
