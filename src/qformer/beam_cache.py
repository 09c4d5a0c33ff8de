"""The LLM's key/value cache for beam search, reordered by indexing.

At every step beam search reorders the cache along the batch (``cache.reorder_cache(beam_idx)``);
transformers' layers do it with ``index_select(0, beam_idx)``, which on the CPU (torch 2.13, fp32)
is several times slower than the same gather written ``keys[beam_idx]`` (3x to 20x on 2 busy
cores for a (40, 12, 63, 64) tensor): at 5 beams it took half of a caption's time in the
profiler, and indexing made the caption of bench/bench_stage2_generate.py 1.4-2x faster. The
result is the same tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin


class BeamCache(DynamicCache):
    """A ``DynamicCache`` whose plain layers reorder by indexing; any layer with its own
    ``reorder_cache`` (quantised, linear attention, ...) keeps it."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            plain = type(layer).reorder_cache is CacheLayerMixin.reorder_cache
            if plain and layer.is_initialized and layer.get_seq_length() > 0:
                index = beam_idx.to(layer.keys.device)
                layer.keys, layer.values = layer.keys[index], layer.values[index]  # (B * beams, heads, T, d)
            else:
                layer.reorder_cache(beam_idx)


def beam_search_cache(language_model: PreTrainedModel, generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"cache": ...}`` for ``language_model.generate`` when it would build its default dynamic
    cache for a beam search; otherwise nothing (the caller's cache or cache settings stand)."""
    config = language_model.generation_config
    beams = generation_kwargs.get("num_beams", config.num_beams) or 1
    chosen = {"cache", "past_key_values", "cache_implementation"} & generation_kwargs.keys()
    if (beams <= 1 or chosen or config.cache_implementation is not None
            or not generation_kwargs.get("use_cache", config.use_cache)
            or not language_model._supports_default_dynamic_cache()):
        return {}
    text_config = language_model.config.get_text_config(decoder=True)
    cache = BeamCache(config=text_config)
    if language_model.config.is_encoder_decoder:
        cache = EncoderDecoderCache(cache, BeamCache(config=text_config))
    return {"cache": cache}
