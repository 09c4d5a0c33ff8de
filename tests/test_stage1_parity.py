"""Stage 1 against transformers' Blip2ForImageTextRetrieval (tiny random model built here), and
LAVIS's stage-1 key layout."""

import pytest
import torch
from torch.testing import assert_close

from qformer.convert.blip2_layouts import stage1_config_from_transformers, stage1_to_lavis, stage1_to_transformers
from qformer.pretrained.lavis import stage1_from_lavis
from qformer.pretrained.stage1 import Blip2Stage1, extract_features
from qformer.pretrained.transformers import stage1_from_transformers
from stage1_helpers import tiny_retrieval_model, tiny_stage1

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

IMAGE = 28


@pytest.fixture(scope="module")
def pair():
    ref = tiny_retrieval_model()
    ours, report = stage1_from_transformers(ref.state_dict(), stage1_config_from_transformers(ref.config))
    return ref, ours.eval(), report


def inputs(batch=3):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(1, 49, (batch, 6), generator=g)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[1, -2:] = 0
    return pixels, ids, mask


def test_report_says_what_transformers_lacks(pair):
    _, ours, report = pair
    assert sorted(report.dropped) == sorted(
        ["qformer.lm_head.bias", "qformer.lm_head.dense.bias", "qformer.lm_head.dense.weight",
         "qformer.lm_head.norm.bias", "qformer.lm_head.norm.weight", "temp"]
    )
    assert ours.temp.item() == pytest.approx(0.07)
    assert ours.config.ln_vision_eps == 1e-6  # transformers' post_layernorm eps (LAVIS: 1e-5)


def test_vision_tower_matches(pair):
    ref, ours, _ = pair
    pixels, _, _ = inputs()
    expected = ref.vision_model(pixel_values=pixels).last_hidden_state
    assert_close(ours.image_embeds(pixels), expected, rtol=1e-5, atol=1e-5)


def test_itm_logits_match(pair):
    ref, ours, _ = pair
    pixels, ids, mask = inputs()
    expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    image_kv = ours.qformer.encoder_key_values(ours.image_embeds(pixels))
    got = ours.itm_logits(ours.multimodal_pass(ids, mask, image_kv).last_hidden_state)
    assert_close(got, expected.logits_per_image, rtol=1e-5, atol=1e-5)


def test_itc_logits_match(pair):
    ref, ours, _ = pair
    pixels, ids, mask = inputs()
    expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    features = extract_features(ours, ours.image_embeds(pixels), ids, mask)
    assert_close(features.image, expected.image_embeds, rtol=1e-5, atol=1e-5)
    assert_close(features.text, expected.text_embeds, rtol=1e-5, atol=1e-5)
    assert_close(ours.similarity(features.image, features.text), expected.logits_per_image, rtol=1e-5, atol=1e-5)


def test_transformers_round_trip_is_exact(pair):
    ref, ours, _ = pair
    back, report = stage1_to_transformers(ours.state_dict())
    state = ref.state_dict()
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert "temp" in report.dropped


def test_lavis_layout_round_trip_and_names():
    model = tiny_stage1()
    lavis, _ = stage1_to_lavis(model.state_dict())
    for key in [
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.0.attn.q_bias",
        "visual_encoder.blocks.0.attn.v_bias",
        "visual_encoder.blocks.1.mlp.fc2.bias",
        "ln_vision.weight",
        "query_tokens",
        "Qformer.bert.embeddings.word_embeddings.weight",
        "Qformer.bert.embeddings.LayerNorm.weight",
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
        "Qformer.bert.encoder.layer.2.intermediate.dense.weight",
        "Qformer.cls.predictions.transform.dense.weight",
        "Qformer.cls.predictions.decoder.weight",
        "vision_proj.weight",
        "text_proj.bias",
        "itm_head.weight",
        "temp",
    ]:
        assert key in lavis, key
    assert not any(k.endswith("attn.qkv.bias") for k in lavis)
    back, report = stage1_from_lavis(lavis, model.config)
    assert report.unmatched == [] and not any("fresh" in why for why in report.dropped.values())
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_lavis_without_image_encoder_and_loud_failures():
    model = tiny_stage1()
    lavis, _ = stage1_to_lavis(model.state_dict())
    no_vision = model.config.replace(vision=None)
    back, report = stage1_from_lavis(lavis, no_vision)
    assert back.vision is None and "visual_encoder.cls_token" in report.dropped
    with pytest.raises(KeyError, match="Qformer.bert.surprise"):
        stage1_from_lavis({**lavis, "Qformer.bert.surprise": torch.zeros(1)}, model.config)
    untied = {**lavis, "Qformer.cls.predictions.decoder.weight": torch.zeros_like(lavis["Qformer.cls.predictions.decoder.weight"])}
    with pytest.raises(ValueError, match="not tied"):
        stage1_from_lavis(untied, model.config)
    broken = {k: v for k, v in lavis.items() if k != "itm_head.weight"}
    with pytest.raises(ValueError, match="itm_head.weight"):
        stage1_from_lavis(broken, model.config)


def test_save_and_load_stage1(tmp_path):
    model = tiny_stage1().eval()
    model.save_pretrained(tmp_path)
    loaded = Blip2Stage1.from_pretrained(tmp_path).eval()
    pixels, ids, mask = inputs()
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())
    a = extract_features(model, model.image_embeds(pixels), ids, mask)
    b = extract_features(loaded, loaded.image_embeds(pixels), ids, mask)
    assert_close(a.multimodal, b.multimodal)  # to rounding: a BLAS may round by a tensor's alignment
