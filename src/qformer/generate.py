"""Decoding with the Q-Former's own LM head (BLIP-2 stage-1 captioning), through transformers'
``generate``.

LAVIS's ``Blip2Qformer.generate`` hands its BERT fork to transformers' ``generate`` (4.26, the
version it was pinned to for this path); so do we, so that greedy, beam search (finished
hypotheses leave the beam, the minimum length masked after the log-softmax, the length
normalisation, ``early_stopping``), sampling (``top_k``, ``top_p``, ``temperature``) and every
other option of :class:`transformers.GenerationConfig` behave as transformers' do. The queries
read the image once per image (LAVIS runs them once per beam); each step then feeds the newest
token through the cached self-attention, as ITG is trained. ``tests/test_qformer_generate.py``
compares the tokens with LAVIS's own, computed by LAVIS's code on the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from qformer.checks import check_positions
from qformer.models.qformer import QFormerCache, QFormerModel


@dataclass
class DecodingOptions:
    """The common decoding settings, with transformers' defaults (``top_k`` 50, as LAVIS's
    sampling gets them); any other :class:`transformers.GenerationConfig` field can be passed
    to :func:`qformer_generate` as a keyword. Greedy (``num_beams=1``), beam search, or sampling
    (``do_sample``, one beam)."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    early_stopping: bool | str = False
    do_sample: bool = False
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams, max_new_tokens and num_return_sequences must be >= 1")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling draws from one beam: use num_beams=1 with do_sample")
        if self.num_return_sequences > max(self.num_beams, 1) and not self.do_sample:
            raise ValueError("num_return_sequences must be <= num_beams unless sampling")
        if self.repetition_penalty <= 0 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("repetition_penalty and temperature must be > 0, top_p in (0, 1], top_k >= 0")


class QFormerDecoder(PreTrainedModel, GenerationMixin):
    """The Q-Former's text decoder as ``generate`` drives a decoder-only model: each call runs
    the new tokens (B, T) against the :class:`QFormerCache` (queries first, then the text so
    far) and returns the logits (B, T, V) and the grown cache."""

    main_input_name = "input_ids"

    def __init__(self, qformer: QFormerModel, eos_token_id: int) -> None:
        config = qformer.config
        super().__init__(PretrainedConfig(vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                                          pad_token_id=config.pad_token_id, eos_token_id=eos_token_id,
                                          is_decoder=True))
        self.qformer = qformer
        self.eos_token_id = eos_token_id

    def _update_finished_beams(self, *, sequences: Tensor, beam_scores: Tensor, beam_indices: Tensor,
                               is_sent_finished: Tensor, topk_running_sequences: Tensor, topk_log_probs: Tensor,
                               next_token_hits_stopping_criteria: Tensor, top_num_beam_mask: Tensor, num_beams: int,
                               cur_len: int, decoder_prompt_len: int, length_penalty: float,
                               early_stopping: bool | str, **rest) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Beam search's finished hypotheses as transformers 4.26 (LAVIS's pin) chose them. Both
        keep a hypothesis that ends with eos among the step's best ``num_beams`` candidates, its
        score divided by (generated tokens) ** length_penalty. For those that reach the maximum
        length without eos, 4.26 differs from 5:

        - they come from its running beams (the best ``num_beams`` candidates that are not eos),
          not from the best ``num_beams`` candidates of all;
        - only for a caption not yet done after the eos hypotheses of that last step are kept (by
          the early-stopping rule of :meth:`_check_early_stop_heuristic`);
        - their score is divided by (generated tokens + 1) ** length_penalty, their length with ``[DEC]``.
        """
        self._best_candidate = topk_log_probs[:, :1]  # (B, 1), read by _check_early_stop_heuristic
        ended = next_token_hits_stopping_criteria  # (B, 2 x beams), candidates best first
        ends_with_eos = topk_running_sequences[:, :, cur_len] == self.eos_token_id
        shared = dict(topk_running_sequences=topk_running_sequences, top_num_beam_mask=torch.ones_like(top_num_beam_mask),
                      num_beams=num_beams, cur_len=cur_len, decoder_prompt_len=decoder_prompt_len,
                      length_penalty=length_penalty, early_stopping=early_stopping, **rest)
        sequences, beam_scores, beam_indices, is_sent_finished = super()._update_finished_beams(
            sequences=sequences, beam_scores=beam_scores, beam_indices=beam_indices, is_sent_finished=is_sent_finished,
            topk_log_probs=topk_log_probs, next_token_hits_stopping_criteria=ended & ends_with_eos & top_num_beam_mask,
            **shared)
        by_length = ended & ~ends_with_eos & ((~ends_with_eos).cumsum(1) <= num_beams)
        if not bool(by_length.any()):
            return sequences, beam_scores, beam_indices, is_sent_finished
        generated = cur_len + 1 - decoder_prompt_len
        full = is_sent_finished.all(dim=1, keepdim=True)  # (B, 1)
        done = full & ((early_stopping is True)
                       | (beam_scores.min(dim=1, keepdim=True)[0] >= self._best_candidate / generated**length_penalty))
        return super()._update_finished_beams(
            sequences=sequences, beam_scores=beam_scores, beam_indices=beam_indices, is_sent_finished=is_sent_finished,
            topk_log_probs=topk_log_probs * (generated / (generated + 1)) ** length_penalty,  # then / generated ** lp
            next_token_hits_stopping_criteria=by_length & ~done, **shared)

    def _check_early_stop_heuristic(self, *, running_beam_scores: Tensor, **rest) -> Tensor:
        """Whether beam search may still improve, bounded as transformers 4.26 bounds it: by the
        step's best candidate, eos or not (5 bounds by the best running beam, which stops sooner)."""
        return super()._check_early_stop_heuristic(running_beam_scores=self._best_candidate, **rest)

    def forward(self, input_ids: Tensor, cache: QFormerCache, use_cache: bool = True,
                return_dict: bool = True) -> CausalLMOutputWithPast:
        if not use_cache:
            raise ValueError("the Q-Former decodes against the cache of its queries: use_cache must stay on")
        out = self.qformer(input_ids=input_ids, past_key_values=cache, is_decoder=True, use_cache=True)
        return CausalLMOutputWithPast(logits=out.logits, cache=out.past_key_values)


@torch.no_grad()
def qformer_generate(
    model: QFormerModel,
    query_embeds: Tensor,
    image_key_values: tuple,
    eos_token_id: int,
    pad_token_id: int | None = None,
    options: DecodingOptions = DecodingOptions(),
    **generate_kwargs,
) -> Tensor:
    """Captions (B x num_return_sequences, <= max_new_tokens) after the ``[DEC]`` bos, eos
    included, then padding; a caption's returned sequences are adjacent rows.

    query_embeds (B, Q, D); ``image_key_values`` from :meth:`QFormerModel.encoder_key_values`.
    ``generate_kwargs`` (any :class:`transformers.GenerationConfig` field) override ``options``;
    ``min_new_tokens`` is capped at ``max_new_tokens``.
    Sampling draws from torch's global generator (``torch.manual_seed`` for a repeatable draw).
    """
    bos = model.config.bos_token_id
    if bos is None:
        raise ValueError("the Q-Former config has no bos_token_id ([DEC])")
    settings = asdict(options) | generate_kwargs
    settings["min_new_tokens"] = min(settings["min_new_tokens"], settings["max_new_tokens"])  # a shorter cap wins
    if not settings["do_sample"]:  # sampling's own settings (LAVIS's top_p 0.9) stay unused, unsaid
        settings |= {"top_k": 50, "top_p": 1.0, "temperature": 1.0}
    generation = GenerationConfig(**settings, bos_token_id=bos, eos_token_id=eos_token_id,
                                  pad_token_id=model.config.pad_token_id if pad_token_id is None else pad_token_id)
    check_positions(f"max_new_tokens={generation.max_new_tokens} ([DEC] first)", generation.max_new_tokens,
                    model.config.max_position_embeddings, "the Q-Former's position table (max_position_embeddings)",
                    "generate fewer tokens")
    batch = query_embeds.shape[0]
    rows_per_image = generation.num_beams if generation.num_beams > 1 else generation.num_return_sequences
    prefix = model(query_embeds=query_embeds, encoder_key_values=image_key_values, use_cache=True).past_key_values
    cache = prefix.index_select(torch.arange(batch, device=query_embeds.device).repeat_interleave(rows_per_image))
    start = torch.full((batch, 1), bos, dtype=torch.long, device=query_embeds.device)
    tokens = QFormerDecoder(model, eos_token_id).generate(input_ids=start, cache=cache, generation_config=generation)
    return pad_after_eos(tokens[:, 1:], eos_token_id, generation.pad_token_id)


def pad_after_eos(tokens: Tensor, eos_token_id: int, pad_token_id: int) -> Tensor:
    """Padding after each row's first eos (B, L), as LAVIS's captions have it: transformers
    fills finished beams with eos where the pad id is 0 (it tests the id for truth)."""
    is_eos = (tokens == eos_token_id).long()
    return tokens.masked_fill(is_eos.cumsum(1) - is_eos > 0, pad_token_id)
