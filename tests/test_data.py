"""The training data pipeline: transforms, caption cleaning, annotation formats, datasets,
tar shards, worker/rank splitting, skipping unreadable samples, and collation."""

from __future__ import annotations

import io
import json
import random
import tarfile
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from qformer.config import ImageConfig
from qformer.data import shards as shards_module
from qformer.data.collate import CaptionCollator, VQACollator
from qformer.data.datasets import (
    CaptionDataset,
    CaptionRecord,
    Skipped,
    VQADataset,
    read_captions,
    read_coco_captions,
    read_csv_captions,
    read_jsonl_captions,
    read_vqa,
)
from qformer.data.shards import TarShardDataset, _stable_id, write_tar_shard
from qformer.data.transforms import (
    TrainTransform,
    clean_caption,
    clean_question,
    eval_image,
    eval_transform,
    random_resized_crop_box,
    train_transform,
)
from qformer.tokenizer import load_tokenizer

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

CONFIG = ImageConfig(size=16)
EVAL = partial(eval_image, config=CONFIG)


@pytest.fixture(scope="module")
def tokenizer(minilm_path: Path):
    return load_tokenizer(minilm_path)


def noise(seed: int, width: int = 24, height: int = 20) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save(root: Path, name: str, seed: int = 0) -> str:
    noise(seed).save(root / name)
    return name


def truncated_jpeg(seed: int) -> bytes:
    """The first half of a JPEG file."""
    buffer = io.BytesIO()
    noise(seed, 64, 64).save(buffer, format="JPEG")
    return buffer.getvalue()[: buffer.tell() // 2]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Dog (brown) runs!!  On the grass.\n", "a dog brown runs on the grass"),
        ("It's a cat, isn't it?", "it's a cat, isn't it?"),
        ('#tag: "quoted"; ~tilde* end', "tag quoted tilde end"),
        ("  Two\tspaces\n\nand lines  ", "two spaces and lines"),
    ],
)
def test_clean_caption(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_clean_caption_truncates_words() -> None:
    assert clean_caption("One two. Three four five", max_words=3) == "one two three"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("What color is the T-shirt/hat?", "what color is the t shirt hat?"),
        ('Is "this" (really) a dog.', "is this really a dog"),
        ("How  many... birds?!", "how many birds?"),
        ("Where's the cat, then?  ", "where's the cat, then?"),
    ],
)
def test_clean_question(raw: str, expected: str) -> None:
    assert clean_question(raw) == expected


def test_clean_question_truncates_words() -> None:
    assert clean_question("a b-c d e", max_words=3) == "a b c"


def test_white_image_normalises_exactly() -> None:
    white = Image.new("RGB", (30, 22), (255, 255, 255))
    expected = (1 - torch.tensor(CONFIG.mean)) / torch.tensor(CONFIG.std)  # (3,)
    expected = expected[:, None, None].expand(3, 16, 16)
    assert torch.equal(eval_image(white, CONFIG), expected)
    assert torch.equal(train_transform(white, CONFIG, random.Random(3)), expected)


def test_eval_image_is_eval_transform_row(tmp_path: Path) -> None:
    path = tmp_path / save(tmp_path, "a.png", seed=1)
    images = [noise(2, 40, 30), path]
    batch = eval_transform(images, CONFIG)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(batch[0], eval_image(images[0], CONFIG))
    assert torch.equal(batch[1], eval_image(path, CONFIG))
    resized = np.asarray(noise(2, 40, 30).resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    mean, std = np.asarray(CONFIG.mean, dtype=np.float32), np.asarray(CONFIG.std, dtype=np.float32)
    reference = (resized - mean) / std  # (S, S, 3)
    assert torch.equal(batch[0], torch.from_numpy(reference).permute(2, 0, 1))


def test_train_transform_is_deterministic() -> None:
    image = noise(0, 40, 32)
    first = train_transform(image, CONFIG, random.Random(7))
    assert first.shape == (3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, train_transform(image, CONFIG, random.Random(7)))
    others = [train_transform(image, CONFIG, random.Random(seed)) for seed in range(8, 12)]
    assert not all(torch.equal(first, other) for other in others)


def test_train_transform_is_crop_then_flip_then_eval() -> None:
    image = noise(1, 40, 32)
    flips = set()
    for seed in range(16):
        replay = random.Random(seed)
        box = random_resized_crop_box(40, 32, replay)
        flip = replay.random() < 0.5
        flips.add(flip)
        cropped = image.crop(box)
        if flip:
            cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert torch.equal(train_transform(image, CONFIG, random.Random(seed)), eval_image(cropped, CONFIG))
    assert flips == {True, False}


@pytest.mark.parametrize("width, height", [(200, 160), (160, 200), (300, 300)])
def test_crop_box_in_bounds_with_scale_and_ratio(width: int, height: int) -> None:
    rng = random.Random(0)
    scales = []
    for _ in range(2000):
        left, top, right, bottom = random_resized_crop_box(width, height, rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        crop_w, crop_h = right - left, bottom - top
        scales.append(crop_w * crop_h / (width * height))
        assert 0.74 <= crop_w / crop_h <= 1.35  # 3/4 .. 4/3, up to rounding to whole pixels
    assert 0.49 <= min(scales) < 0.52 and 0.97 < max(scales) <= 1.0  # 0.5 .. 1, up to rounding
    assert sum(scale < 0.6 for scale in scales) > 200  # spread over the range, not stuck at one end


def test_crop_box_falls_back_to_a_centred_crop() -> None:
    # no 3/4..4/3 box of half the area or more fits: the centre crop clamped to that ratio
    assert random_resized_crop_box(4, 200, random.Random(0)) == (0, 97, 4, 102)
    assert random_resized_crop_box(200, 4, random.Random(0)) == (97, 0, 102, 4)


def test_train_transform_object_repeats_for_one_torch_seed() -> None:
    image = noise(3, 40, 32)
    first, second = TrainTransform(CONFIG), TrainTransform(CONFIG)
    draws = [first(image), first(image)]
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], second(image)) and torch.equal(draws[1], second(image))


def test_coco_official_format(tmp_path: Path) -> None:
    save(tmp_path, "1.png", 1), save(tmp_path, "2.png", 2)
    coco = {
        "images": [{"id": 10, "file_name": "1.png"}, {"id": 20, "file_name": "2.png"}],
        "annotations": [
            {"image_id": 10, "caption": "A Cat."},
            {"image_id": 20, "caption": "A dog!"},
            {"image_id": 10, "caption": "A sleeping cat"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    records = read_captions(tmp_path / "coco.json")
    assert records == [
        CaptionRecord("1.png", "A Cat.", 10),
        CaptionRecord("2.png", "A dog!", 20),
        CaptionRecord("1.png", "A sleeping cat", 10),
    ]
    dataset = CaptionDataset(records, tmp_path, EVAL)
    samples = [dataset[i] for i in range(3)]
    assert [s["text"] for s in samples] == ["a cat", "a dog", "a sleeping cat"]
    assert [s["image_id"] for s in samples] == [0, 1, 0]
    assert dataset.image_index == {"10": 0, "20": 1}
    assert torch.equal(samples[0]["image"], eval_image(tmp_path / "1.png", CONFIG))

    del coco["annotations"][1]["caption"]
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"bad\.json: annotations\[1\].*caption"):
        read_coco_captions(tmp_path / "bad.json")


def test_coco_list_format(tmp_path: Path) -> None:
    entries = [
        {"image": "a.png", "caption": ["first", "second"]},
        {"image": "b.png", "caption": "third", "image_id": "b"},
        {"image": "a.png", "caption": "fourth"},
    ]
    (tmp_path / "list.json").write_text(json.dumps(entries))
    records = read_coco_captions(tmp_path / "list.json")
    assert [(r.image, r.caption, r.image_id) for r in records] == [
        ("a.png", "first", None),
        ("a.png", "second", None),
        ("b.png", "third", "b"),
        ("a.png", "fourth", None),
    ]
    assert CaptionDataset(records, tmp_path).image_index == {"a.png": 0, "b": 1}

    (tmp_path / "bad.json").write_text(json.dumps([*entries, {"caption": "no image"}]))
    with pytest.raises(ValueError, match=r"bad\.json: entry 3.*image"):
        read_coco_captions(tmp_path / "bad.json")


def test_jsonl_format(tmp_path: Path) -> None:
    lines = ['{"image": "a.png", "caption": "one", "image_id": 5}', "", '{"image": "b.png", "caption": "two"}']
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    assert read_captions(tmp_path / "caps.jsonl") == [CaptionRecord("a.png", "one", 5), CaptionRecord("b.png", "two")]

    (tmp_path / "bad.jsonl").write_text("\n".join([*lines, '{"image": "c.png"}']))
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 4.*caption"):
        read_jsonl_captions(tmp_path / "bad.jsonl")


def test_csv_format(tmp_path: Path) -> None:
    (tmp_path / "caps.csv").write_text('image,caption,image_id\na.png,"a dog, running",7\nb.png,a cat,\n')
    assert read_captions(tmp_path / "caps.csv") == [
        CaptionRecord("a.png", "a dog, running", "7"),
        CaptionRecord("b.png", "a cat", None),
    ]
    (tmp_path / "short.csv").write_text("image,caption\na.png,fine\nb.png\n")
    with pytest.raises(ValueError, match=r"short\.csv: line 3.*caption"):
        read_csv_captions(tmp_path / "short.csv")
    (tmp_path / "header.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"header\.csv.*\['image'\]"):
        read_csv_captions(tmp_path / "header.csv")
    with pytest.raises(ValueError, match="unknown caption file type"):
        read_captions(tmp_path / "caps.tsv")


def test_vqa_format_dataset_and_collate(tmp_path: Path, tokenizer) -> None:
    save(tmp_path, "q.png", 4)
    entries = [
        {"image": "q.png", "question": "What is on the T-shirt?", "answer": ["dog", "dog", "cat", "dog"]},
        {"image": "q.png", "question": "Is it red?", "answer": "yes", "question_id": 99},
        {"image": "gone.png", "question": "Lost?", "answer": "no"},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(entries))
    records = read_vqa(tmp_path / "vqa.json")
    assert records[0].answers == ["dog", "dog", "cat", "dog"] and records[1].answers == ["yes"]
    dataset = VQADataset(records, tmp_path, EVAL)
    first = dataset[0]
    assert first["question"] == "what is on the t shirt?"
    assert first["answers"] == ["dog", "cat"] and first["weights"] == [0.75, 0.25]
    assert first["question_id"] == 0 and dataset[1]["question_id"] == 99
    assert dataset[2] is None and dataset.skipped == 1

    batch = VQACollator(tokenizer)([dataset[0], None, dataset[1]])
    assert batch["skipped"] == 1 and batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["prompts"] == ["Question: what is on the t shirt? Answer:", "Question: is it red? Answer:"]
    assert batch["answers"] == [["dog", "cat"], ["yes"]] and batch["question_ids"] == [0, 99]
    expected = tokenizer(batch["prompts"], padding="longest", return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])

    (tmp_path / "bad.json").write_text(json.dumps([{"image": "q.png", "question": "no answer?"}]))
    with pytest.raises(ValueError, match=r"bad\.json: entry 0.*answer"):
        read_vqa(tmp_path / "bad.json")


def test_caption_collate_pads_right_truncates_and_counts(tokenizer) -> None:
    long = "a very long caption that goes on and on about many different things in the scene"
    samples = [
        {"image": torch.zeros(3, 16, 16), "text": "a cat", "image_id": 3},
        None,
        {"image": torch.ones(3, 16, 16), "text": long, "image_id": 5},
        Skipped("shard.tar:000007"),
    ]
    batch = CaptionCollator(tokenizer, max_length=8)(samples)
    assert batch["skipped"] == 2 and batch["texts"] == ["a cat", long]
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["pixel_values"][1], torch.ones(3, 16, 16))
    assert batch["image_ids"].dtype == torch.long and batch["image_ids"].tolist() == [3, 5]
    assert batch["input_ids"].shape == (2, 8)
    short = tokenizer("a cat")["input_ids"]
    assert batch["input_ids"][0, : len(short)].tolist() == short
    assert batch["attention_mask"].tolist() == [[1] * len(short) + [0] * (8 - len(short)), [1] * 8]
    assert (batch["input_ids"][0, len(short) :] == tokenizer.pad_token_id).all()
    assert batch["input_ids"][1, -1] == tokenizer.sep_token_id

    empty = CaptionCollator(tokenizer)([None, Skipped("x")])
    assert empty["skipped"] == 2 and empty["pixel_values"] is None and empty["texts"] == []


def broken_dataset(root: Path, strict: bool = False) -> CaptionDataset:
    """Four good images and three unreadable ones: missing, truncated JPEG, text named .jpg."""
    names = [save(root, f"good{i}.png", i) for i in range(4)]
    (root / "truncated.jpg").write_bytes(truncated_jpeg(0))
    (root / "text.jpg").write_text("not an image")
    names[1:1] = ["missing.jpg", "truncated.jpg"]
    names.insert(5, "text.jpg")
    records = [CaptionRecord(name, f"caption {name}") for name in names]
    return CaptionDataset(records, root, EVAL, strict=strict)


def test_unreadable_samples_are_skipped_and_counted_across_workers(tmp_path: Path, tokenizer) -> None:
    dataset = broken_dataset(tmp_path)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=CaptionCollator(tokenizer))
    batches = list(loader)
    assert sum(batch["skipped"] for batch in batches) == 3
    texts = [text for batch in batches for text in batch["texts"]]
    assert texts == [f"caption good{i} png" for i in range(4)]
    images = torch.cat([b["pixel_values"] for b in batches if b["pixel_values"] is not None])  # (4, 3, S, S)
    assert torch.equal(images[2], eval_image(tmp_path / "good2.png", CONFIG))
    assert dataset.skipped == 0  # the workers counted, not this process: the collate is what counts


@pytest.mark.parametrize("index, name", [(1, "missing.jpg"), (2, "truncated.jpg"), (5, "text.jpg")])
def test_strict_mode_names_the_sample(tmp_path: Path, index: int, name: str) -> None:
    dataset = broken_dataset(tmp_path, strict=True)
    assert dataset[0]["text"] == "caption good0 png"
    with pytest.raises(ValueError, match=rf"sample {index} \(.*{name}\)"):
        dataset[index]


def write_shards(root: Path, shards: int = 4, per_shard: int = 3) -> list[Path]:
    paths = []
    for s in range(shards):
        samples = [
            {"__key__": f"{s}{i:04d}", "jpg": noise(10 * s + i), "txt": f"Shard {s}, item {i}."}
            for i in range(per_shard)
        ]
        samples[0]["json"] = {"image_id": 1000 + s}
        paths.append(write_tar_shard(root / f"shard-{s}.tar", samples))
    return paths


def all_texts(shards: int = 4, per_shard: int = 3) -> list[str]:
    return [f"shard {s}, item {i}" for s in range(shards) for i in range(per_shard)]


def test_tar_shards_stream_samples(tmp_path: Path) -> None:
    shards = write_shards(tmp_path)
    samples = list(TarShardDataset(shards, EVAL))
    assert [s["text"] for s in samples] == all_texts()
    assert samples[0]["image_id"] == 1000 and samples[3]["image_id"] == 1001
    assert samples[1]["image_id"] == _stable_id("00001") != samples[2]["image_id"]
    with tarfile.open(shards[0]) as tar:
        decoded = Image.open(io.BytesIO(tar.extractfile("00001.jpg").read()))
        assert torch.equal(samples[1]["image"], eval_image(decoded, CONFIG))


def test_tar_shards_split_across_workers(tmp_path: Path, tokenizer) -> None:
    dataset = TarShardDataset(write_shards(tmp_path), EVAL)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=CaptionCollator(tokenizer))
    texts = [text for batch in loader for text in batch["texts"]]
    assert sorted(texts) == sorted(all_texts())  # each sample exactly once


def test_tar_shards_split_across_ranks_and_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards(tmp_path, shards=5, per_shard=1)
    per_rank = [[s["text"] for s in TarShardDataset(shards, EVAL, rank=r, world_size=2)] for r in range(2)]
    assert per_rank == [
        ["shard 0, item 0", "shard 2, item 0", "shard 4, item 0"],
        ["shard 1, item 0", "shard 3, item 0"],
    ]
    monkeypatch.setattr(shards_module, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    assert TarShardDataset(shards, EVAL, rank=1, world_size=2).local_shards() == [shards[3]]
    assert TarShardDataset(shards, EVAL, rank=0, world_size=2).local_shards() == [shards[1]]
    with pytest.raises(ValueError, match="rank 2"):
        TarShardDataset(shards, EVAL, rank=2, world_size=2)


def test_tar_bad_samples_are_skipped_and_counted(tmp_path: Path, tokenizer) -> None:
    good = {"__key__": "a", "png": noise(1), "txt": "fine"}
    corrupt = {"__key__": "b", "jpg": truncated_jpeg(2), "txt": "corrupt"}
    no_caption = {"__key__": "c", "png": noise(3)}
    not_image = {"__key__": "d", "jpg": b"plain text", "txt": "text"}
    shard = write_tar_shard(tmp_path / "bad.tar", [good, corrupt, no_caption, not_image])
    full = write_tar_shard(tmp_path / "full.tar", [good, {**good, "__key__": "e"}])
    with tarfile.open(full) as tar:
        cut_at = tar.getmember("e.png").offset_data + 10
    (tmp_path / "cut.tar").write_bytes(full.read_bytes()[:cut_at])  # sample "a" whole, "e" cut
    dataset = TarShardDataset([shard, tmp_path / "cut.tar"], EVAL)
    samples = list(dataset)
    assert [s.name for s in samples if isinstance(s, Skipped)] == [
        f"{shard}:b",
        f"{shard}:c",
        f"{shard}:d",
        str(tmp_path / "cut.tar"),
    ]
    assert dataset.skipped == 4
    batch = CaptionCollator(tokenizer)(samples)
    assert batch["skipped"] == 4 and batch["texts"] == ["fine", "fine"]

    with pytest.raises(ValueError, match=r"bad\.tar:b"):
        list(TarShardDataset([shard], EVAL, strict=True))


@pytest.mark.parametrize("size, mode", [((640, 480), "RGB"), ((17, 300), "RGBA"), ((100, 100), "I;16"), ((224, 224), "RGB")])
def test_eval_resized_keeps_what_evaluation_would_read(size, mode):
    """What the server keeps of an upload while it waits (the image at the model's input size)
    preprocesses to exactly the pixels of the upload itself."""
    from qformer.data.transforms import eval_image, eval_resized, load_image

    rng = np.random.default_rng(sum(size))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    config = ImageConfig()
    kept = eval_resized(load_image(io.BytesIO(buffer.getvalue())), config)
    assert kept.size == (config.size, config.size) and kept.mode == "RGB"
    assert torch.equal(eval_image(kept, config), eval_image(io.BytesIO(buffer.getvalue()), config))
