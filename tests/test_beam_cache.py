"""BeamCache reorders as transformers' DynamicCache does (by indexing instead of index_select)."""

import torch
from transformers import DynamicCache, OPTConfig

from qformer.beam_cache import BeamCache, beam_search_cache


def test_reorder_equals_dynamic_cache():
    config = OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32)
    ours, theirs = BeamCache(config=config), DynamicCache(config=config)
    for layer in range(2):
        keys, values = torch.randn(6, 2, 5, 8), torch.randn(6, 2, 5, 8)
        ours.update(keys, values, layer)
        theirs.update(keys, values, layer)
    beam_idx = torch.tensor([0, 0, 2, 5, 5, 1])
    ours.reorder_cache(beam_idx)
    theirs.reorder_cache(beam_idx)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_only_for_a_default_beam_search():
    from transformers import OPTForCausalLM

    llm = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                                   vocab_size=32, max_position_embeddings=16))
    assert isinstance(beam_search_cache(llm, {"num_beams": 3})["cache"], BeamCache)
    assert beam_search_cache(llm, {"num_beams": 1}) == {}
    assert beam_search_cache(llm, {"num_beams": 3, "cache_implementation": "static"}) == {}
    assert beam_search_cache(llm, {"num_beams": 3, "use_cache": False}) == {}
