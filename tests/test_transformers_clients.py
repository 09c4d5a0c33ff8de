"""transformers as the client of what qformer writes, and the other way round.

A stage-2 directory saved by ``save_pretrained`` (what a run's final/ and ``qformer export``
hold), read by ``AutoProcessor``, transformers' model class and its ``image-text-to-text``
pipeline, gives the image to the model and decodes as ``qformer caption`` does; a converted
retrieval model scores as ours through ``Blip2ForImageTextRetrieval`` and its processor; and a
directory transformers saved captions in qformer with transformers' tokens. Without
``num_query_tokens`` in ``processor_config.json`` the processor put no ``<image>`` token in the
text and transformers dropped the image without a word."""

import json

import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipImageProcessor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    pipeline,
)

from qformer import load_tokenizer
from qformer.cli import main
from qformer.pretrained.conversion import convert
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.pretrained.stage2 import CAPTION_DEFAULTS, Blip2
from stage1_helpers import IMAGE_CONFIG, usable_stage1
from stage2_helpers import IMAGE, QUERIES, save_tiny_blip2, tiny_tokenizer, tiny_transformers_blip2
from test_instructblip import tiny_transformers_instructblip

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

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


def caption_cli(capsys, directory, images, prompt: str) -> list[str]:
    """What ``qformer caption --model DIRECTORY IMAGES --prompt PROMPT`` prints, one caption per image."""
    main(["caption", "--model", str(directory), *map(str, images), "--prompt", prompt, "--json", "--device", "cpu"])
    return [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]


def as_list(ids) -> list[int]:
    return list(ids) if isinstance(ids, list) else [ids]


def test_transformers_reads_our_stops_and_caption_decoding(exported):
    """transformers' BLIP-2 generate runs the LLM's generate, whose defaults come from the text
    config: the stop ids are there (OPT's "\\n" among them), and generation_config.json holds
    qformer caption's beams and lengths."""
    kind, ours, directory, reference_class = exported
    reference = reference_class.from_pretrained(directory)
    stops = Blip2.from_pretrained(directory).stop_token_ids()
    assert as_list(reference.language_model.generation_config.eos_token_id) == stops
    assert stops == ([1, 3] if kind == "opt" else [1])  # </s>, and "\\n" after OPT's captions
    saved = reference.generation_config
    assert {name: getattr(saved, name) for name in CAPTION_DEFAULTS} == CAPTION_DEFAULTS
    assert as_list(saved.eos_token_id) == stops and saved.pad_token_id == ours.tokenizer.pad_token_id


def test_pipeline_and_generate_caption_as_qformer_caption(exported, tmp_path, capsys):
    kind, _, directory, _ = exported
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"{seed}.png")
        noise(seed).save(paths[-1])
    pipe = pipeline("image-text-to-text", model=str(directory))
    decoding = {"generation_config": pipe.model.generation_config}  # transformers' BLIP-2 takes it as passed
    processor = AutoProcessor.from_pretrained(directory)
    captions = []
    for prompt in ("", PROMPT):
        ours_printed = caption_cli(capsys, directory, paths, prompt)
        piped = [pipe(images=str(path), text=prompt, generate_kwargs=decoding, return_full_text=False)[0]
                 ["generated_text"].strip() for path in paths]
        inputs = processor(images=[Image.open(path) for path in paths], text=[prompt] * 2, padding=True,
                           return_tensors="pt")
        with torch.no_grad():
            tokens = pipe.model.generate(**inputs, **decoding)
        new = tokens if kind == "t5" else tokens[:, inputs.input_ids.shape[1]:]
        generated = [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
        assert ours_printed == piped == generated, prompt
        captions += ours_printed
        if kind == "opt" and not prompt:  # no text at all: the queries and text_config's bos, OPT's tokenizer's bos
            with torch.no_grad():
                bare = pipe.model.generate(pixel_values=inputs.pixel_values, **decoding)
            assert torch.equal(bare, tokens)
    assert sum(bool(caption) for caption in captions) >= 2  # the pipeline did caption


def test_a_converted_retrieval_model_scores_as_ours_through_transformers(minilm_path, tmp_path):
    """qformer convert --to transformers on a stage-1 model: AutoProcessor gives
    Blip2ForImageTextRetrieval inputs (no place kept for queries in the Q-Former's text) on which
    it scores as ours."""
    model = usable_stage1(load_tokenizer(minilm_path))
    model.save_pretrained(tmp_path / "stage1")
    convert(tmp_path / "stage1", tmp_path / "hf", to="transformers")
    ours = Blip2Stage1.from_pretrained(tmp_path / "stage1")
    config = json.loads((tmp_path / "hf" / "processor_config.json").read_text(encoding="utf-8"))
    assert config["processor_class"] == "Blip2Processor" and config["num_query_tokens"] is None
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    reference = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    images, texts = [noise(1), noise(2), noise(3)], ["a red square on grass", "two cats", "green"]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_values"]
    assert inputs.pixel_values.shape[-1] == IMAGE_CONFIG.size
    with torch.no_grad():
        itm = reference(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=1)[:, 1]
        itc = reference(**inputs, use_image_text_matching_head=False).logits_per_image
    assert (itc[0] - itc[1]).abs().max() > 1e-3  # two images, two rows: the images reached the model
    assert_close(ours.itm_scores(images, texts), itm, rtol=1e-5, atol=1e-5)
    assert_close(ours.itc_scores(images, texts), itc, rtol=1e-5, atol=1e-5)


def save_with_transformers(kind: str, directory) -> None:
    """A BLIP-2 or InstructBLIP directory as transformers writes it: the model's and the
    processor's save_pretrained. OPT's eos is "\\n", as in the released blip2-opt models."""
    image_processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    if kind == "instructblip":
        tiny_transformers_instructblip("llama").save_pretrained(directory)
        InstructBlipProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(add_bos=True),
                              qformer_tokenizer=tiny_tokenizer(add_bos=False),
                              num_query_tokens=QUERIES).save_pretrained(directory)
        return
    model = tiny_transformers_blip2(kind)
    if kind == "opt":
        model.config.text_config.eos_token_id = 3
    model.save_pretrained(directory)
    Blip2Processor(image_processor=image_processor, tokenizer=tiny_tokenizer(add_bos=kind == "opt"),
                   num_query_tokens=QUERIES).save_pretrained(directory)


@pytest.mark.parametrize("kind", ["opt", "t5", "instructblip"])
def test_transformers_saved_directories_caption_in_qformer_with_transformers_tokens(kind, tmp_path, capsys):
    save_with_transformers(kind, tmp_path / "model")
    reference_class = InstructBlipForConditionalGeneration if kind == "instructblip" else Blip2ForConditionalGeneration
    reference = reference_class.from_pretrained(tmp_path / "model").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    ours = Blip2.from_pretrained(tmp_path / "model")
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"{seed}.png")
        noise(seed).save(paths[-1])
    images = [Image.open(path) for path in paths]
    captions = []
    for prompt in ("", PROMPT):
        inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
        with torch.no_grad():  # transformers' own decoding defaults but for the beams and lengths
            theirs = reference.generate(**inputs, **CAPTION_DEFAULTS)
        theirs = theirs[:, 1:] if kind == "t5" else theirs[:, inputs.input_ids.shape[1]:]
        text = ours.tokenizer([prompt] * 2, return_tensors="pt")
        with torch.no_grad():
            tokens = ours.generate(inputs.pixel_values, text.input_ids, text.attention_mask,
                                   **ours.instruction([prompt] * 2), **CAPTION_DEFAULTS,
                                   eos_token_id=ours.stop_token_ids(), pad_token_id=ours.tokenizer.pad_token_id)
        width, pad = max(theirs.shape[1], tokens.shape[1]), ours.tokenizer.pad_token_id
        assert torch.equal(torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=pad),
                           torch.nn.functional.pad(theirs, (0, width - theirs.shape[1]), value=pad)), prompt
        expected = [caption.strip() for caption in processor.batch_decode(theirs, skip_special_tokens=True)]
        assert caption_cli(capsys, tmp_path / "model", paths, prompt) == expected
        captions += expected
    assert sum(bool(caption) for caption in captions) >= 2
