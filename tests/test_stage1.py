"""Stage 1 on one process: the shared-K/V step against the plain reference, negatives,
freezing, precomputed features."""

import pytest
import torch
from torch.testing import assert_close

from qformer.losses import HardNegatives, positives_mask, sample_hard_negatives
from qformer.objective import Stage1Objective
from stage1_helpers import IMAGE, reference_step, tiny_batch, tiny_stage1

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

B = 4


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("image_ids", [None, torch.tensor([0, 1, 0, 2])])
def test_shared_kv_step_equals_reference(image_ids):
    model = tiny_stage1()
    ids, mask, features = tiny_batch(B)
    neg_image = torch.tensor([1, 0, 3, 2]) if image_ids is None else torch.tensor([1, 0, 3, 0])
    neg_text = torch.tensor([2, 3, 1, 0]) if image_ids is None else torch.tensor([1, 3, 1, 1])
    negatives = HardNegatives(neg_image, neg_text, torch.ones(B, dtype=torch.bool))

    out = Stage1Objective(model)(ids, mask, image_features=features, image_ids=image_ids, negatives=negatives)
    out.loss.backward()
    ours = grads(model)
    model.zero_grad()
    itc, itm, itg = reference_step(model, ids, mask, features, neg_image, neg_text, image_ids)
    (itc + itm + itg).backward()
    ref = grads(model)

    assert_close(out.itc, itc, rtol=1e-5, atol=1e-5)
    assert_close(out.itm, itm, rtol=1e-5, atol=1e-5)
    assert_close(out.itg, itg, rtol=1e-5, atol=1e-5)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_every_trainable_parameter_learns_and_the_encoder_stays_frozen():
    model = tiny_stage1().train()
    assert not model.vision.training
    assert all(not p.requires_grad for p in model.vision.parameters())
    ids, mask, _ = tiny_batch(B)
    pixels = torch.randn(B, 3, IMAGE, IMAGE)
    Stage1Objective(model)(ids, mask, pixel_values=pixels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    assert all(p.grad is None for p in model.vision.parameters())


def test_precomputed_features_equal_pixels():
    model = tiny_stage1().eval()
    ids, mask, _ = tiny_batch(B)
    pixels = torch.randn(B, 3, IMAGE, IMAGE)
    negatives = HardNegatives(torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]), torch.ones(B, dtype=torch.bool))
    objective = Stage1Objective(model)
    from_pixels = objective(ids, mask, pixel_values=pixels, negatives=negatives)
    features = model.encode_image(pixels)
    assert not features.requires_grad and features.shape == (B, 5, 24)
    from_features = objective(ids, mask, image_features=features, negatives=negatives)
    assert_close(from_pixels.loss, from_features.loss)
    with pytest.raises(ValueError, match="exactly one"):
        objective(ids, mask)


def test_half_precision_encoder_is_frozen_and_castable():
    from qformer.pretrained.stage1 import Blip2Stage1
    from stage1_helpers import tiny_stage1_config

    model = Blip2Stage1(tiny_stage1_config().replace(vision_dtype="bfloat16"))
    assert model.vision.patch_embedding.weight.dtype == torch.bfloat16
    features = model.encode_image(torch.randn(2, 3, IMAGE, IMAGE))
    assert features.dtype == torch.bfloat16
    assert model.image_embeds(image_features=features).dtype == torch.float32


def test_negatives_never_positive_and_follow_the_softmax():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 2
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    positives = positives_mask(6, 6, 0, image_ids, image_ids)
    counts = torch.zeros(6, 6)
    draws = 4000
    for _ in range(draws):
        negatives = sample_hard_negatives(sim, sim.t(), positives, generator=g)
        assert not positives[torch.arange(6), negatives.text].any()
        assert not positives[torch.arange(6), negatives.image].any()
        counts[torch.arange(6), negatives.text] += 1
    expected = sim.masked_fill(positives, float("-inf")).softmax(dim=1)
    assert_close(counts / draws, expected, atol=0.03, rtol=0)


def test_negative_sampling_survives_inf_nan_and_batch_size_one():
    sim = torch.tensor([[1.0, float("inf"), 0.0], [float("nan"), 2.0, float("-inf")], [float("inf")] * 3])
    positives = positives_mask(3, 3, 0)
    negatives = sample_hard_negatives(sim, sim, positives)
    assert negatives.valid.all()
    assert negatives.text[0] == 1  # +inf is certain
    assert not positives[torch.arange(3), negatives.text].any()
    # batch size 1: no negative exists; the step still runs, ITM only on the positive pair
    model = tiny_stage1()
    ids, mask, features = tiny_batch(1)
    out = Stage1Objective(model)(ids, mask, image_features=features)
    assert not out.negatives.valid.any()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # every image the same: no negative anywhere either
    ids, mask, features = tiny_batch(3)
    out = Stage1Objective(model)(ids, mask, image_features=features, image_ids=torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(out.loss) and not out.negatives.valid.any()


def test_sampled_negatives_are_reproducible_with_a_generator():
    model = tiny_stage1()
    ids, mask, features = tiny_batch(B)
    objective = Stage1Objective(model)
    a = objective(ids, mask, image_features=features, generator=torch.Generator().manual_seed(5))
    b = objective(ids, mask, image_features=features, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.negatives.image, b.negatives.image) and torch.equal(a.negatives.text, b.negatives.text)
    assert_close(a.loss, b.loss)


def test_temperature_is_kept_in_range_and_keeps_its_gradient():
    """Clamped in place, as LAVIS: at a bound the loss still moves it (a clamp in the graph
    would give it a zero gradient there, and it could never come back)."""
    model = tiny_stage1()
    ids, mask, features = tiny_batch(4)
    for value, bound in ((5.0, 0.5), (-1.0, 0.001)):
        with torch.no_grad():
            model.temp.fill_(value)
        out = Stage1Objective(model)(ids, mask, image_features=features)
        assert model.temp.item() == pytest.approx(bound)
        model.zero_grad()
        out.itc.backward()
        assert model.temp.grad is not None and model.temp.grad.abs().item() > 0


def test_any_transformers_vision_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from qformer.models.vision import TransformersVisionTower
    from qformer.pretrained.stage1 import Blip2Stage1
    from stage1_helpers import tiny_stage1_config

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=IMAGE, patch_size=14))
    config = tiny_stage1_config(vision=False)
    model = Blip2Stage1(config, vision=TransformersVisionTower(clip)).train()
    assert not model.vision.training and all(not p.requires_grad for p in model.vision.parameters())
    ids, mask, _ = tiny_batch(B)
    pixels = torch.randn(B, 3, IMAGE, IMAGE)
    assert_close(model.encode_image(pixels), clip(pixel_values=pixels).last_hidden_state)
    Stage1Objective(model)(ids, mask, pixel_values=pixels).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    with pytest.raises(ValueError, match="24 wide"):
        Blip2Stage1(config.replace(qformer=config.qformer.replace(encoder_hidden_size=16)),
                    vision=TransformersVisionTower(clip))


def test_position_table_resizes_for_larger_images():
    """BLIP-2 runs its 224-px encoder at 364 px by resizing the position table bicubically."""
    from qformer.models.vision import interpolate_position_embedding

    table = torch.randn(1, 1 + 4, 8)  # class position + 2x2 grid
    assert interpolate_position_embedding(table, 5) is table
    grown = interpolate_position_embedding(table, 1 + 16)  # 4x4 grid
    assert grown.shape == (1, 17, 8)
    assert torch.equal(grown[:, 0], table[:, 0])  # the class position is kept
    flat = torch.ones(1, 5, 8)
    assert_close(interpolate_position_embedding(flat, 17), torch.ones(1, 17, 8))  # a constant stays constant
    with pytest.raises(ValueError, match="square grid"):
        interpolate_position_embedding(table, 7)
