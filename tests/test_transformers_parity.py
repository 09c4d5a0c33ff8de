"""Parity with transformers' Q-Formers: tiny random models built here, loaded through our adapter."""

import pytest
import torch
from torch.testing import assert_close
from transformers import Blip2QFormerConfig, InstructBlipQFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings
from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel

from qformer.convert.qformer_layouts import qformer_config_from_transformers, qformer_to_transformers
from qformer.pretrained.qformer import load_transformers_qformer, qformer_from_transformers

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

CONFIGS = {
    # name: (hidden, heads, layers, cross frequency, image width, queries)
    "freq2": (32, 4, 4, 2, 24, 8),
    "freq1-one-query": (32, 4, 3, 1, 24, 1),
    "odd-widths": (30, 6, 3, 2, 13, 5),  # head size 5, image width 13
    "many-queries": (16, 2, 2, 2, 20, 32),
}


def transformers_config(cls, name, **extra):
    hidden, heads, layers, freq, width, _ = CONFIGS[name]
    return cls(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2 + 3,
        max_position_embeddings=24,
        cross_attention_frequency=freq,
        encoder_hidden_size=width,
        **extra,
    )


def randomise(*modules):
    """Random weights everywhere (transformers' init leaves LayerNorms at 1/0 and biases at 0)."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0, 0.3)
            for m in module.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.add_(1.0)


def batch(name, vocab=64, text_len=7, image_len=6, b=3):
    hidden, _, _, _, width, queries = CONFIGS[name]
    text_mask = torch.ones(b, text_len, dtype=torch.long)
    text_mask[1, -3:] = 0  # padding
    image_mask = torch.ones(b, image_len, dtype=torch.long)
    image_mask[2, -2:] = 0
    return dict(
        ids=torch.randint(1, vocab, (b, text_len)),
        text_mask=text_mask,
        queries=torch.randn(b, queries, hidden),
        image=torch.randn(b, image_len, width),
        image_mask=image_mask,
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_blip2_query_pass(name):
    """Stage 2 and ITC image side: queries only, cross-attention to the image."""
    ref = Blip2QFormerModel(transformers_config(Blip2QFormerConfig, name)).eval()
    randomise(ref)
    ours = load_transformers_qformer(ref).eval()
    assert not ours.config.use_text_input and ours.lm_head is None
    x = batch(name)
    expected = ref(
        query_embeds=x["queries"], encoder_hidden_states=x["image"], encoder_attention_mask=x["image_mask"]
    ).last_hidden_state
    got = ours(
        query_embeds=x["queries"], encoder_hidden_states=x["image"], encoder_attention_mask=x["image_mask"]
    ).last_hidden_state
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_blip2_text_input_itm_and_text_passes(name):
    """Blip2ForImageTextRetrieval's passes: ITM ([queries; text], bidirectional) and the text side
    of ITC (text only), with its separate ``embeddings`` module."""
    config = transformers_config(Blip2QFormerConfig, name, use_qformer_text_input=True)
    ref = Blip2QFormerModel(config).eval()
    embeddings = Blip2TextEmbeddings(config).eval()
    randomise(ref, embeddings)
    ours = load_transformers_qformer(ref, embeddings).eval()
    x = batch(name)
    q = x["queries"].shape[1]
    mask = torch.cat([torch.ones(3, q, dtype=torch.long), x["text_mask"]], dim=1)
    # No image mask here: transformers' Blip2QFormerModel sizes a partial image mask for all
    # positions instead of the query positions and fails with text input (its InstructBLIP
    # Q-Former does it right, tested below); its retrieval model always sends an all-ones mask.
    expected = ref(
        query_embeds=embeddings(input_ids=x["ids"], query_embeds=x["queries"]),
        query_length=q,
        attention_mask=mask,
        encoder_hidden_states=x["image"],
    ).last_hidden_state
    got = ours(
        input_ids=x["ids"], query_embeds=x["queries"], attention_mask=mask, encoder_hidden_states=x["image"]
    ).last_hidden_state
    keep = mask.bool()
    assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)

    expected_text = ref(
        query_embeds=embeddings(input_ids=x["ids"]), query_length=0, attention_mask=x["text_mask"]
    ).last_hidden_state
    got_text = ours(input_ids=x["ids"], attention_mask=x["text_mask"]).last_hidden_state
    keep = x["text_mask"].bool()
    assert_close(got_text[keep], expected_text[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_instructblip_instruction_pass(name):
    """InstructBLIP: instruction tokens and queries in one bidirectional pass."""
    ref = InstructBlipQFormerModel(transformers_config(InstructBlipQFormerConfig, name)).eval()
    randomise(ref)
    ours = load_transformers_qformer(ref, layout="instructblip").eval()
    x = batch(name)
    q = x["queries"].shape[1]
    mask = torch.cat([torch.ones(3, q, dtype=torch.long), x["text_mask"]], dim=1)
    kwargs = dict(
        input_ids=x["ids"],
        attention_mask=mask,
        query_embeds=x["queries"],
        encoder_hidden_states=x["image"],
        encoder_attention_mask=x["image_mask"],
    )
    expected = ref(**kwargs).last_hidden_state
    got = ours(**kwargs).last_hidden_state
    keep = mask.bool()
    assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    # the queries that go on to the LLM: every row
    assert_close(got[:, :q], expected[:, :q], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layout, config_cls, extra",
    [
        ("blip2", Blip2QFormerConfig, {}),
        ("blip2", Blip2QFormerConfig, {"use_qformer_text_input": True}),
        ("instructblip", InstructBlipQFormerConfig, {}),
    ],
)
def test_round_trip_is_tensor_equal(layout, config_cls, extra):
    ref_cls = InstructBlipQFormerModel if layout == "instructblip" else Blip2QFormerModel
    config = transformers_config(config_cls, "freq2", **extra)
    ref = ref_cls(config)
    randomise(ref)
    state = dict(ref.state_dict())
    if extra.get("use_qformer_text_input"):
        embeddings = Blip2TextEmbeddings(config)
        state.update({f"embeddings.{k}": v for k, v in embeddings.state_dict().items()})
    ours = qformer_from_transformers(state, qformer_config_from_transformers(config, layout), layout)
    back, report = qformer_to_transformers(ours.state_dict(), layout)
    assert report.dropped == {} and report.unmatched == []
    assert sorted(back) == sorted(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_lm_head_is_reported_as_dropped_in_transformers_layout():
    from qformer import QFormer, QFormerConfig

    config = QFormerConfig(vocab_size=40, bos_token_id=39, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=20, encoder_hidden_size=8)
    _, report = qformer_to_transformers(QFormer(config).state_dict(), "blip2")
    assert sorted(report.dropped) == ["lm_head.bias", "lm_head.dense.bias", "lm_head.dense.weight",
                                      "lm_head.norm.bias", "lm_head.norm.weight"]


def test_unknown_missing_and_misshaped_keys_fail_loudly():
    config = transformers_config(Blip2QFormerConfig, "freq2")
    state = dict(Blip2QFormerModel(config).state_dict())
    ours_config = qformer_config_from_transformers(config)
    unknown = {**state, "encoder.layer.0.attention.rotary.weight": torch.zeros(2)}
    with pytest.raises(KeyError, match="encoder.layer.0.attention.rotary.weight"):
        qformer_from_transformers(unknown, ours_config)
    missing = {k: v for k, v in state.items() if "layer.1.output_query.dense" not in k}
    with pytest.raises(ValueError, match=r"2 missing:\n.*layers.1.query_ffn.fc2.bias\n.*layers.1.query_ffn.fc2.weight"):
        qformer_from_transformers(missing, ours_config)
    bad = {**state, "layernorm.weight": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"embeddings.norm.weight: checkpoint \(5,\) vs model \(32,\)"):
        qformer_from_transformers(bad, ours_config)
    with pytest.raises(ValueError, match="unknown transformers layout"):
        qformer_from_transformers(state, ours_config, layout="lavis")
