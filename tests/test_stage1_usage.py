"""A stage-1 model as users use it: from_pretrained (our layout and transformers'
Blip2ForImageTextRetrieval) with tokenizer and preprocessing, features and ITM / ITC scores from
paths, PIL images and strings, search over a folder, and ``qformer retrieve``."""

import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessor

from qformer import Blip2Stage1, load_tokenizer
from qformer.cli import main
from qformer.data.transforms import eval_transform
from qformer.pretrained.stage1 import extract_features, tokenize
from qformer.retrieval import caption_texts, retrieval_scores, search
from qformer.train.config import load_train_config
from qformer.train.loop import train
from qformer.train.stage1_job import evaluate_retrieval
from stage1_helpers import IMAGE, IMAGE_CONFIG, tiny_retrieval_model, usable_stage1
from stage2_helpers import save_tiny_blip2

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red square on grass", "two cats on a pink blanket", "green"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)  # bert-base-uncased's vocabulary + [DEC]


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture
def photos(tmp_path) -> Path:
    """Five pictures, a file that is not an image and a text file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(noise_images(5)):
        image.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def readable(folder: Path) -> list[str]:
    return [str(folder / f"{i}.png") for i in range(5)]


def test_our_layout_round_trip_with_tokenizer_and_image_config(tokenizer, photos, tmp_path):
    model = usable_stage1(tokenizer)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer_config.json").is_file()
    assert not any(p.name.startswith(".") for p in (tmp_path / "model").iterdir())  # no temporary files left
    loaded = Blip2Stage1.from_pretrained(tmp_path / "model")
    assert not loaded.training and loaded.config.image == IMAGE_CONFIG
    assert loaded.tokenizer(TEXTS).input_ids == tokenizer(TEXTS).input_ids
    assert loaded.tokenizer.bos_token == "[DEC]"
    images = readable(photos)[:3]
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())
    # Bit-equal weights, outputs equal to rounding (a BLAS may round by a tensor's alignment).
    a, b = model.extract_features(images, TEXTS), loaded.extract_features(images, TEXTS)
    for name in ("image", "text", "multimodal"):
        assert_close(getattr(a, name), getattr(b, name), msg=name)
    assert_close(model.itm_scores(images, TEXTS), loaded.itm_scores(images, TEXTS))
    assert_close(model.itc_scores(images, TEXTS), loaded.itc_scores(images, TEXTS))

    model.tokenizer = None  # saved without one: images still work, text says what is missing
    model.save_pretrained(tmp_path / "bare")
    bare = Blip2Stage1.from_pretrained(tmp_path / "bare")
    assert bare.tokenizer is None and bare.extract_features(images).text is None
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        bare.extract_features(texts=TEXTS)


@pytest.fixture(scope="module")
def itm_dir(tmp_path_factory, minilm_path):
    """transformers' layout as on the hub (blip2-itm-vit-g): weights, tokenizer, processor."""
    directory = tmp_path_factory.mktemp("blip2-itm")
    bert = AutoTokenizer.from_pretrained(str(minilm_path))
    reference = tiny_retrieval_model(len(bert) + 1)  # as the hub's: BERT's vocabulary + 1
    reference.save_pretrained(directory)
    image_processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=list(IMAGE_CONFIG.mean),
                                         image_std=list(IMAGE_CONFIG.std))
    Blip2Processor(image_processor=image_processor, tokenizer=bert).save_pretrained(directory)
    return directory, reference


def test_transformers_layout_matches_transformers(itm_dir, caplog):
    directory, reference = itm_dir
    with caplog.at_level(logging.INFO):
        ours = Blip2Stage1.from_pretrained(directory)
    fresh = [r.getMessage() for r in caplog.records if "initialised fresh" in r.getMessage()]
    assert len(fresh) == 1 and "qformer.lm_head" in fresh[0] and "temp" in fresh[0]
    assert ours.config.image == IMAGE_CONFIG  # from processor_config.json, not 224 / 384 defaults
    assert not ours.training and ours.temp.item() == pytest.approx(0.07)

    images = noise_images(3, seed=1)
    processor = Blip2Processor.from_pretrained(directory)  # its two halves (the whole wants num_query_tokens)
    inputs = {**processor.tokenizer(TEXTS, padding=True, return_tensors="pt"),
              **processor.image_processor(images, return_tensors="pt")}
    inputs.pop("token_type_ids")
    assert inputs["input_ids"].tolist() == tokenize(ours, TEXTS)[0].tolist()
    with torch.no_grad():
        itm = reference(**inputs, use_image_text_matching_head=True)
        itc = reference(**inputs, use_image_text_matching_head=False)
    assert_close(ours.itm_scores(images, TEXTS), itm.logits_per_image.softmax(dim=1)[:, 1], rtol=1e-5, atol=1e-5)
    assert_close(ours.itc_scores(images, TEXTS), itc.logits_per_image, rtol=1e-5, atol=1e-5)
    features = ours.extract_features(images, TEXTS)
    assert_close(features.image, itc.image_embeds, rtol=1e-5, atol=1e-5)
    assert_close(features.text, itc.text_embeds, rtol=1e-5, atol=1e-5)

    half = Blip2Stage1.from_pretrained(directory, dtype="fp16")  # as LAVIS: the image encoder alone
    assert {p.dtype for p in half.vision.parameters()} == {torch.float16} and half.config.vision_dtype == "float16"
    assert all(p.dtype == torch.float32 for n, p in half.named_parameters() if not n.startswith("vision."))
    bf16 = Blip2Stage1.from_pretrained(directory, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_extract_features_equals_the_tensor_level_one(tokenizer, photos):
    model = usable_stage1(tokenizer)
    paths = readable(photos)[:3]
    pixels = eval_transform(paths, IMAGE_CONFIG)  # (3, 3, S, S)
    text = tokenizer(TEXTS, padding=True, return_tensors="pt")
    expected = extract_features(model, model.image_embeds(pixels), text.input_ids, text.attention_mask)
    got = model.extract_features(paths, TEXTS)
    for name in ("image", "text", "multimodal"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    mixed = [Path(paths[0]), Image.open(paths[1]), pixels[2]]  # a path, a PIL image, pixels
    assert torch.equal(model.extract_features(mixed).image, expected.image)
    assert torch.equal(model.extract_features(pixels).image, expected.image)
    # Alone, an image goes through kernels of another batch size, which may round differently.
    assert_close(model.extract_features(paths[0]).image, expected.image[:1])
    only_text = model.extract_features(texts=TEXTS)
    assert only_text.image is None and only_text.multimodal is None and torch.equal(only_text.text, expected.text)

    itm = model.itm_logits(model.multimodal_pass(text.input_ids, text.attention_mask, model.qformer.encoder_key_values(
        model.image_embeds(pixels))).last_hidden_state).softmax(dim=-1)[:, 1]
    assert torch.equal(model.itm_scores(paths, TEXTS), itm)
    assert model.itc_scores(paths[:2], TEXTS).shape == (2, 3)
    assert torch.equal(model.itc_scores(paths, TEXTS), model.similarity(expected.image, expected.text))
    assert tokenize(model, " ".join(["word"] * 60))[0].shape == (1, 32)  # BLIP-2's 32 text tokens

    for call, message in (
        (lambda: model.extract_features(paths[:2], TEXTS), "got 2 image\\(s\\) and 3 text\\(s\\)"),
        (lambda: model.itm_scores(paths, TEXTS[:1]), "itm_scores pairs images with texts"),
        (lambda: model.extract_features(), "pass images, texts or both"),
        (lambda: model.extract_features(torch.zeros(1, 3, 20, 20)), f"\\(N, 3, {IMAGE}, {IMAGE}\\)"),
        (lambda: model.extract_features([pixels[0], torch.zeros(3, 20, 20)]), "different shapes"),
        (lambda: model.extract_features(texts=[1, 2]), "a string or a non-empty list of strings"),
        (lambda: model.extract_features([photos / "broken.png"]), "cannot read image"),
        (lambda: model.extract_features([]), "images: none given"),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def expected_ranking(model, paths, queries, k, top):
    """The ranking from retrieval_scores (ITC top k re-ranked by ITM + ITC) over every image."""
    embeds = model.image_embeds(eval_transform(paths, model.config.image))
    ids, mask = tokenize(model, queries)
    _, t2i = retrieval_scores(model, embeds, ids, mask, k=k)
    rows = []
    for scores in t2i:
        best = scores.argsort(descending=True)[:top]
        rows.append(([paths[i] for i in best], scores[best]))
    return rows


def test_search_skips_unreadable_images_and_ranks_as_retrieval_scores(tokenizer, photos):
    model = usable_stage1(tokenizer)
    queries = ["a red square", "green grass in the sun"]
    result = search(model, photos, queries, top=3, k=4, batch_size=2)
    assert result.queries == queries
    assert len(result.skipped) == 1 and str(photos / "broken.png") in result.skipped[0]
    for (names, scores), matches in zip(expected_ranking(model, readable(photos), queries, 4, 3), result.matches):
        assert [image for image, _ in matches] == names
        assert_close(torch.tensor([score for _, score in matches]), scores, rtol=1e-5, atol=1e-5)
    one_at_a_time = search(model, readable(photos) + [str(photos / "broken.png")], queries, top=3, k=4, batch_size=1)
    assert [[m for m, _ in row] for row in one_at_a_time.matches] == [[m for m, _ in row] for row in result.matches]

    # k defaults to BLIP-2's 128 (here: every one of the 5 images is re-ranked by ITM)
    assert all(inspect.signature(f).parameters["k"].default == 128 for f in (search, retrieval_scores,
                                                                               evaluate_retrieval))
    (names, scores), = expected_ranking(model, readable(photos), queries[:1], 5, 5)
    everything = search(model, photos / "*.png", queries[0], top=5)
    assert [image for image, _ in everything.matches[0]] == names
    assert_close(torch.tensor([score for _, score in everything.matches[0]]), scores, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="must not exceed k"):
        search(model, photos, "x", top=5, k=4)
    with pytest.raises(ValueError, match="no readable image"):
        search(model, [photos / "broken.png"], "x")


def test_training_run_final_is_ready_to_use(tmp_path):
    config = load_train_config(ROOT / "configs" / "tiny.yaml", ["--output_dir", str(tmp_path), "--steps", "2"])
    train(config)
    final = Blip2Stage1.from_pretrained(tmp_path / "final")
    assert final.tokenizer is not None and final.tokenizer.bos_token == "[DEC]"
    assert final.itc_scores(noise_images(2), TEXTS).shape == (2, 3)


def test_cli_retrieve(tokenizer, photos, tmp_path, capsys):
    model = usable_stage1(tokenizer)
    model.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "qformer", "retrieve", "--model", str(tmp_path / "model"), "--images",
               str(photos), "--query", "a red square", "--query", "green", "--top", "2", "--k", "3",
               "--batch-size", "2", "--device", "cpu"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # an image could not be read: named, the others ranked
    assert f"qformer retrieve: cannot read image {photos / 'broken.png'}" in done.stderr
    assert "1 skipped" in done.stderr and "Traceback" not in done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    expected = search(model, photos, ["a red square", "green"], top=2, k=3)
    assert [(r["query"], r["rank"], r["image"]) for r in rows] == [
        (query, rank, image) for query, matches in zip(expected.queries, expected.matches)
        for rank, (image, _) in enumerate(matches, start=1)]
    assert_close(torch.tensor([r["score"] for r in rows]),
                 torch.tensor([score for matches in expected.matches for _, score in matches]), rtol=1e-5, atol=1e-5)

    save_tiny_blip2(tmp_path / "stage2", "opt")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    capsys.readouterr()  # what saving printed
    for model_dir, options, message in (
        (tmp_path / "stage2", [], "holds a stage-2 model (Blip2ForConditionalGeneration), not stage 1"),
        (tmp_path / "bert", [], "model_type 'bert') is not a stage-1 BLIP-2 model"),
        (tmp_path / "missing", [], "is not a local directory"),
        (tmp_path / "model", ["--top", "5", "--k", "3"], "top (5) must not exceed k (3)"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["retrieve", "--model", str(model_dir), "--images", str(photos), "--query", "x", *options])
        err = capsys.readouterr().err
        assert stop.value.code == 1 and err.startswith("qformer retrieve: ") and message in err
        assert len(err.strip().splitlines()) == 1, err


def test_convert_keeps_tokenizer_and_preprocessing(itm_dir, tmp_path):
    """qformer convert from and to transformers' retrieval layout carries the tokenizer and the
    image preprocessing, so that each side loads ready to use."""
    from qformer.pretrained.conversion import convert

    directory, _ = itm_dir
    convert(directory, tmp_path / "ours", to="qformer")
    ours = Blip2Stage1.from_pretrained(tmp_path / "ours")
    assert ours.config.image == IMAGE_CONFIG and ours.tokenizer is not None
    convert(tmp_path / "ours", tmp_path / "back", to="transformers")
    back = Blip2Stage1.from_pretrained(tmp_path / "back")
    assert back.config.image == IMAGE_CONFIG
    assert tokenize(back, TEXTS)[0].tolist() == tokenize(ours, TEXTS)[0].tolist()


def test_cli_caption_with_a_stage1_model(tokenizer, itm_dir, photos, tmp_path, capsys):
    """qformer caption on a stage-1 model: the Q-Former's captions, as caption_texts gives them;
    what it cannot do is said in one line."""
    model = usable_stage1(tokenizer)
    model.save_pretrained(tmp_path / "model")
    names = readable(photos)[:3]
    main(["caption", "--model", str(tmp_path / "model"), *names, "--json", "--num-beams", "2", "--max-new-tokens", "6",
          "--device", "cpu"])  # no SystemExit: status 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = caption_texts(model, [Image.open(name) for name in names], num_beams=2, max_new_tokens=6)
    assert [row["caption"] for row in rows] == expected and [row["image"] for row in rows] == names
    for model_dir, options, message in (
        (itm_dir[0], [], "Blip2ForImageTextRetrieval, which has no Q-Former LM head"),
        (tmp_path / "model", ["--prompt", "a photo of"], "--prompt needs a BLIP-2 model with an LLM"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["caption", "--model", str(model_dir), names[0], "--device", "cpu", *options])
        err = capsys.readouterr().err
        assert stop.value.code == 1 and message in err and len(err.strip().splitlines()) == 1, err
