"""Wrong inputs to the public entry points and wrong config values: each one line naming the
argument (or field), what it should be and what it is."""

import pytest
import torch

from qformer.config import Blip2Stage1Config, ImageConfig, QFormerConfig, VisionConfig
from qformer.generate import DecodingOptions
from qformer.pretrained.stage2 import Blip2, InstructBlip
from qformer.retrieval import caption_images
from qformer.objective import Stage1Objective
from qformer.train.config import load_train_config
from stage1_helpers import IMAGE, tiny_stage1
from stage2_helpers import tiny_tokenizer, tiny_transformers_blip2

QFORMER_POSITIONS, LLM_POSITIONS, QUERIES = 40, 64, 4  # the tiny models' tables


@pytest.fixture(scope="module")
def models():
    stage1 = tiny_stage1().eval()
    blip2 = Blip2.from_stage1(stage1, tiny_transformers_blip2("opt").language_model,
                              tokenizer=tiny_tokenizer(add_bos=True)).eval()
    instruct = InstructBlip.from_stage1(stage1, tiny_transformers_blip2("llama").language_model,
                                        tokenizer=tiny_tokenizer(add_bos=True)).eval()
    return stage1, blip2, instruct


def pixels(batch):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def ids(batch, length):
    return torch.randint(5, 30, (batch, length), generator=torch.Generator().manual_seed(1))


def ones(batch, length):
    return torch.ones(batch, length, dtype=torch.long)


# each: (what to call on (stage1, blip2, instructblip), the error, the start of its one line)
FAILURES = {
    # more tokens than a position table (today an IndexError, or a device assert on a GPU)
    "qformer text too long": (
        lambda s, b, i: s.qformer(input_ids=ids(1, 41)), ValueError,
        "41 text tokens from position 0 need 41 positions but the Q-Former's position table "
        "(max_position_embeddings) has 40"),
    "stage-1 step text too long": (
        lambda s, b, i: Stage1Objective(s)(ids(2, 41), ones(2, 41), pixel_values=pixels(2)), ValueError,
        "41 text tokens from position 0 need 41"),
    "stage-2 forward text too long": (
        lambda s, b, i: b(pixels(1), ids(1, 61)), ValueError,
        "4 queries + 61 input_ids need 65 positions but the LLM's position table (max_position_embeddings) has 64"),
    "stage-2 generate text too long": (
        lambda s, b, i: b.generate(pixels(1), ids(1, 61), max_new_tokens=1), ValueError, "4 queries + 61 input_ids"),
    "stage-2 generate, too many new tokens": (
        lambda s, b, i: b.generate(pixels(1), max_new_tokens=61), ValueError,
        "4 queries + 0 input_ids + max_new_tokens 61 need 65 positions but the LLM's position table"),
    "instruction too long": (
        lambda s, b, i: i.generate(pixels(1), ids(1, 3), qformer_input_ids=ids(1, 41), max_new_tokens=1), ValueError,
        "41 qformer_input_ids need 41 positions but the Q-Former's position table"),
    "q-former captions too long": (
        lambda s, b, i: caption_images(s, s.image_embeds(pixels(1)), 1, options=DecodingOptions(max_new_tokens=41)),
        ValueError, "max_new_tokens=41 ([DEC] first) need 41 positions but the Q-Former's position table"),
    # images and texts of different batch sizes
    "stage-1 step, 2 images 3 texts": (
        lambda s, b, i: Stage1Objective(s)(ids(3, 5), ones(3, 5), pixel_values=pixels(2)), ValueError,
        "batch sizes differ (input_ids 3, pixel_values 2): pass one row per example"),
    "stage-1 step, 2 feature rows 3 texts": (
        lambda s, b, i: Stage1Objective(s)(ids(3, 5), ones(3, 5), image_features=torch.randn(2, 5, 24)), ValueError,
        "batch sizes differ (input_ids 3, image_features 2)"),
    "stage-2 forward, 2 images 3 texts": (
        lambda s, b, i: b(pixels(2), ids(3, 5), labels=ids(3, 5)), ValueError,
        "batch sizes differ (pixel_values 2, input_ids 3, labels 3)"),
    "stage-2 generate, 2 images 3 prompts": (
        lambda s, b, i: b.generate(pixels(2), ids(3, 5), max_new_tokens=1), ValueError,
        "batch sizes differ (pixel_values 2, input_ids 3)"),
    "q-former, 2 query rows 3 texts": (
        lambda s, b, i: s.qformer(input_ids=ids(3, 5), query_embeds=s.queries(2)), ValueError,
        "batch sizes differ (input_ids 3, query_embeds 2)"),
    "stage-2 generate with no beams": (
        lambda s, b, i: b.generate(pixels(1), num_beams=0, max_new_tokens=1), ValueError,
        "num_beams must be at least 1, got 0"),
    # an empty list (or one image alone) to caption
    "caption of no image": (lambda s, b, i: b.caption([]), ValueError, "images: none given"),
    "answer for no image": (lambda s, b, i: b.answer([], []), ValueError, "images: none given"),
    "caption of one path, not a list": (
        lambda s, b, i: b.caption("photo.png"), TypeError, "images must be a list of images (paths or PIL images)"),
    # raw 0-255 pixels where normalised floats are expected
    "uint8 pixels to the encoder": (
        lambda s, b, i: s.encode_image(torch.full((1, 3, IMAGE, IMAGE), 200, dtype=torch.uint8)), TypeError,
        "pixel_values are torch.uint8, not normalised floats"),
    "uint8 pixels in a training step": (
        lambda s, b, i: Stage1Objective(s.train())(ids(1, 5), ones(1, 5), pixel_values=pixels(1).to(torch.uint8)),
        TypeError, "pixel_values are torch.uint8"),
    "0-255 floats to generate": (
        lambda s, b, i: b.generate(pixels(1).abs() * 255, max_new_tokens=1), ValueError, "pixel_values reach "),
    "0-255 floats to stage-1 features": (
        lambda s, b, i: s.extract_features(torch.rand(2, 3, IMAGE, IMAGE) * 255), ValueError, "pixel_values reach "),
    "channels-last pixels": (
        lambda s, b, i: b(pixels(1).permute(0, 2, 3, 1), ids(1, 3)), ValueError,
        f"pixel_values must be (B, 3, {IMAGE}, {IMAGE}) for this model, got (1, {IMAGE}, {IMAGE}, 3)"),
    "features of the wrong width": (
        lambda s, b, i: s.image_embeds(image_features=torch.randn(2, 5, 16)), ValueError,
        "image_features must be the image encoder's outputs (B, S, 24), got (2, 5, 16)"),
    # a mask of batch 1 broadcast over batch 2 (today silent in the Q-Former)
    "q-former mask of batch 1": (
        lambda s, b, i: s.qformer(input_ids=ids(2, 5), attention_mask=ones(1, 5)), ValueError,
        "batch sizes differ (input_ids 2, attention_mask 1)"),
    "stage-1 step mask of batch 1": (
        lambda s, b, i: Stage1Objective(s)(ids(2, 5), ones(1, 5), pixel_values=pixels(2)), ValueError,
        "attention_mask must have input_ids's shape (2, 5), got (1, 5): one mask row per text"),
    "stage-2 forward mask of batch 1": (
        lambda s, b, i: b(pixels(2), ids(2, 5), ones(1, 5)), ValueError,
        "batch sizes differ (pixel_values 2, input_ids 2, attention_mask 1)"),
    "stage-2 generate mask of another length": (
        lambda s, b, i: b.generate(pixels(2), ids(2, 5), ones(2, 4), max_new_tokens=1), ValueError,
        "attention_mask must have input_ids's shape (2, 5), got (2, 4)"),
    "instruction mask of batch 1": (
        lambda s, b, i: i.generate(pixels(2), qformer_input_ids=ids(2, 3), qformer_attention_mask=ones(1, 3),
                                   max_new_tokens=1), ValueError,
        "batch sizes differ (pixel_values 2, qformer_input_ids 2, qformer_attention_mask 1)"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_wrong_inputs_fail_in_one_line_naming_the_argument(models, case):
    call, error, message = FAILURES[case]
    stage1 = models[0]
    try:
        with pytest.raises(error) as caught:
            call(*models)
    finally:
        stage1.eval()
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text, text


def test_checks_change_nothing_on_good_inputs(models):
    """Pixels within range, masks of the right shape and text within the tables run as before."""
    stage1, blip2, _ = models
    Stage1Objective(stage1)(ids(2, QFORMER_POSITIONS), ones(2, QFORMER_POSITIONS), pixel_values=pixels(2))
    blip2(pixels(2), ids(2, LLM_POSITIONS - QUERIES), ones(2, LLM_POSITIONS - QUERIES))
    new = LLM_POSITIONS - QUERIES  # after the bos: the last new token is not fed back
    assert blip2.generate(pixels(1), max_new_tokens=new, min_new_tokens=new).shape == (1, new)
    caption_images(stage1, stage1.image_embeds(pixels(1)), 1,
                   options=DecodingOptions(max_new_tokens=QFORMER_POSITIONS, min_new_tokens=QFORMER_POSITIONS))
    with torch.no_grad():  # while training, the pixels' range is not read (no host sync in a step)
        stage1.train()
        stage1.encode_image(pixels(1) * 255)
        stage1.eval()


@pytest.mark.parametrize("build, message", [
    (lambda: QFormerConfig(hidden_size=30, num_attention_heads=4),
     "QFormerConfig.hidden_size (30) must be a multiple of num_attention_heads (4)"),
    (lambda: VisionConfig(hidden_size=30, num_attention_heads=4),
     "VisionConfig.hidden_size (30) must be a multiple of num_attention_heads (4)"),
    (lambda: VisionConfig(image_size=300, patch_size=14), "VisionConfig.image_size (300) must be a multiple of"),
    (lambda: QFormerConfig(max_position_embeddings=10**7), "QFormerConfig.max_position_embeddings must be at most"),
    (lambda: QFormerConfig(vocab_size=10**9), "QFormerConfig.vocab_size must be at most 1048576, got 1000000000"),
    (lambda: QFormerConfig(num_hidden_layers=10**6), "QFormerConfig.num_hidden_layers must be at most 1024"),
    (lambda: VisionConfig(image_size=10**6, patch_size=1000), "VisionConfig.image_size must be at most 8192"),
    (lambda: VisionConfig(image_size=8190, patch_size=14),
     "VisionConfig.image_size 8190 in patches of 14 makes 342225 image tokens, more than 65536"),
    (lambda: Blip2Stage1Config(num_query_tokens=10**6), "Blip2Stage1Config.num_query_tokens must be at most 65536"),
    (lambda: ImageConfig(size=0), "ImageConfig.size must be at least 1, got 0"),
    (lambda: ImageConfig(std=(0.0, 0.3, 0.3)), "ImageConfig needs 3 means and 3 positive stds"),
    (lambda: load_train_config(None, ["--data.batch_size", "1000000000"]), "data.batch_size 1000000000 x data.image_size 224 is"),
    (lambda: load_train_config(None, ["--data.image_size", "1000000"]), "data.batch_size 32 x data.image_size 1000000 is"),
])
def test_wrong_config_values_fail_in_one_line_naming_the_field(build, message):
    with pytest.raises(ValueError) as caught:
        build()
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text, text
