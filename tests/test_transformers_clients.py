"""transformers as the client of what qformer writes: a stage-2 directory saved by
``save_pretrained`` (what a run's final/ and ``qformer export`` hold), read by ``AutoProcessor``
and transformers' model class, gives the image to the model, as ``qformer caption`` does.
Without ``num_query_tokens`` in ``processor_config.json`` the processor put no ``<image>`` token
in the text and transformers dropped the image without a word."""

import json

import pytest
import torch
from PIL import Image
from stage2_helpers import QUERIES, save_tiny_blip2, tiny_tokenizer
from test_instructblip import tiny_transformers_instructblip
from torch.testing import assert_close
from transformers import AutoProcessor, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from qformer.blip2 import Blip2

PROMPT = "a photo of"


@pytest.fixture(scope="module", params=["opt", "t5", "instructblip"])
def exported(request, tmp_path_factory):
    """(kind, our model, the directory it saved, transformers' class for it)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    if kind == "instructblip":
        tiny_transformers_instructblip("llama").save_pretrained(root / "source")
        tiny_tokenizer(add_bos=True).save_pretrained(root / "source")
        tiny_tokenizer(add_bos=False).save_pretrained(root / "source" / "qformer_tokenizer")
        reference = InstructBlipForConditionalGeneration
    else:
        save_tiny_blip2(root / "source", kind)
        reference = Blip2ForConditionalGeneration
    ours = Blip2.from_pretrained(root / "source")
    ours.save_pretrained(root / "export")
    return kind, ours, root / "export", reference


def noise(seed: int) -> Image.Image:
    values = torch.randint(0, 256, (40, 30, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(values.numpy())


def test_the_processor_gives_the_image_to_the_model_as_ours_does(exported):
    kind, ours, directory, reference_class = exported
    config = json.loads((directory / "processor_config.json").read_text(encoding="utf-8"))
    assert config["num_query_tokens"] == QUERIES and config["image_processor"]["size"] == {"height": 28, "width": 28}
    processor = AutoProcessor.from_pretrained(directory)
    inputs = processor(images=[noise(1), noise(2)], text=[PROMPT, PROMPT], return_tensors="pt")
    image_token = ours.config.image_token_index
    assert (inputs.input_ids == image_token).sum(1).tolist() == [QUERIES, QUERIES]
    assert (inputs.input_ids[:, :QUERIES] == image_token).all()  # the queries' places, in front of the text
    reference = reference_class.from_pretrained(directory).eval()
    text_ids, text_mask = inputs.input_ids[:, QUERIES:], inputs.attention_mask[:, QUERIES:]
    extra = {"labels": ours.tokenizer(["red ball", "two"], padding=True, return_tensors="pt").input_ids} \
        if kind == "t5" else {}
    instruction = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
    assert bool(instruction) == (kind == "instructblip")
    with torch.no_grad():
        theirs = reference(**inputs, **extra).logits
        got = ours(inputs.pixel_values, text_ids, text_mask, **extra, **instruction).logits
    theirs = theirs if kind == "t5" else theirs[:, QUERIES:]
    assert (theirs[0] - theirs[1]).abs().max() > 0.1  # two images, two answers: the image reached the model
    assert_close(got, theirs, rtol=1e-4, atol=1e-4)
