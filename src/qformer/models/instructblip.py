"""InstructBLIP: BLIP-2's second stage with an instruction-aware Q-Former.

The Q-Former reads the instruction as well: [queries; instruction tokens] in one bidirectional
pass, the queries cross-attending to the image; only the query outputs are projected in front
of the LLM, which gets the instruction again as its own text.

Tokenising is the caller's: the instruction goes through the Q-Former's BERT tokenizer
(``qformer_input_ids``) and through the LLM's tokenizer (``input_ids``). InstructBLIP truncates
the Q-Former's instruction on the left (``truncation_side="left"``), keeping its end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from qformer.config import Blip2Config
from qformer.models.blip2 import Blip2Stage2Model, move_padding


class InstructBlipStage2Model(Blip2Stage2Model):
    """InstructBLIP (``InstructBlipForConditionalGeneration`` in transformers): the contract of
    :class:`Blip2Stage2Model` plus the instruction for the Q-Former, ``qformer_input_ids`` and
    ``qformer_attention_mask`` (B, T), one per image. Without ``qformer_input_ids`` the queries
    run alone, as with an empty instruction.

    The instruction is re-padded to the right, so that its positions start at 0 in every row and
    a batch gives what each row gives alone (transformers keeps a left-padded batch as is).
    """

    def __init__(
        self, config: Blip2Config, language_model: PreTrainedModel | None = None, vision: nn.Module | None = None
    ) -> None:
        if not config.qformer.use_text_input:
            raise ValueError("InstructBLIP's Q-Former reads the instruction: set config.qformer.use_text_input=True")
        super().__init__(config, language_model, vision)

    def language_model_inputs(
        self,
        image_embeds: Tensor,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, S, W) image embeddings and the (B, T) instruction -> (B, Q, H) projected queries,
        in the LLM's dtype."""
        if qformer_input_ids is None:
            return super().language_model_inputs(image_embeds)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        ids, mask = move_padding(qformer_input_ids, qformer_attention_mask.to(qformer_input_ids.device), "right")
        hidden = self.multimodal_pass(ids, mask, self.qformer.encoder_key_values(image_embeds))
        return self.project(hidden.last_hidden_state[:, : self.num_query_tokens])  # (B, Q, D) -> (B, Q, H)
