"""``qformer shards``: caption files (COCO JSON, JSONL, CSV) and their images written as
webdataset tar shards in img2dataset's layout, read back whole, the same whatever the worker
count, unreadable images skipped and counted, mistakes in one line."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile_data import image_bytes, rotated_jpeg, truncated_jpeg
from qformer.cli import main
from qformer.data import shard_writer
from qformer.data.datasets import Skipped
from qformer.data.shards import TarShardDataset
from qformer.data.transforms import clean_caption

# image file -> its captions, in the order the files give them; None: bytes of no image / no file
CAPTIONS = {
    "dog.jpg": ["A dog on the grass.", "a brown dog", "the dog runs"],
    "cat.jpg": ["A cat asleep"],
    "sideways.jpg": ["a picture stored sideways", "an EXIF orientation"],
    "car.png": ["A red car", "a car parked"],
    "missing.jpg": ["never there"],
    "text.jpg": ["not an image at all"],
    "truncated.jpg": ["half a jpeg"],
    "tree.jpg": ["a tree", "a green tree"],
    "boat.jpg": ["a boat on a lake"],
}
UNREADABLE = {"missing.jpg": "failed_to_download", "text.jpg": "failed_to_resize",
              "truncated.jpg": "failed_to_resize"}
READABLE = [name for name in CAPTIONS if name not in UNREADABLE]
IMAGE_IDS = {name: 100 + i for i, name in enumerate(CAPTIONS)}


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def image_file(name: str, seed: int) -> bytes | None:
    if name == "missing.jpg":
        return None
    special = {"text.jpg": b"this is not an image\n", "truncated.jpg": truncated_jpeg(), "sideways.jpg": rotated_jpeg()}
    if name in special:
        return special[name]
    if name.endswith(".png"):  # smooth, as photographs are (JPEG blurs noise)
        ramp = np.linspace(0, 255, 24, dtype=np.uint8)
        return image_bytes(Image.fromarray(np.stack([np.tile(ramp, (20, 1))] * 3, axis=-1)), "PNG")
    return image_bytes(noise(seed), "JPEG", quality=90)


@pytest.fixture(scope="module")
def data_set(tmp_path_factory) -> Path:
    """The images under ``images/``; the same captions as COCO's official JSON (captions.json),
    JSONL with a caption list per image (captions.jsonl) and CSV with a row per caption."""
    root = tmp_path_factory.mktemp("files")
    (root / "images").mkdir()
    for seed, name in enumerate(CAPTIONS):
        data = image_file(name, seed)
        if data is not None:
            (root / "images" / name).write_bytes(data)
    coco = {"images": [{"id": IMAGE_IDS[name], "file_name": name} for name in CAPTIONS],
            "annotations": [{"image_id": IMAGE_IDS[name], "caption": caption}
                            for caption_index in range(3) for name, captions in CAPTIONS.items()
                            for caption in captions[caption_index:caption_index + 1]]}
    (root / "captions.json").write_text(json.dumps(coco))
    (root / "captions.jsonl").write_text("".join(
        json.dumps({"image": name, "caption": captions, "image_id": IMAGE_IDS[name]}) + "\n"
        for name, captions in CAPTIONS.items()))
    with (root / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "image_id"])
        writer.writerows([name, caption, IMAGE_IDS[name]]
                         for name, captions in CAPTIONS.items() for caption in captions)
    return root


def shards(source: Path, out: Path, *options: str) -> None:
    main(["shards", str(source), str(out), "--image-root", str(source.parent / "images"), *options])


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the shards as key -> {extension: bytes}, checking the tar headers."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


@pytest.mark.parametrize("file", ["captions.json", "captions.jsonl", "captions.csv"])
def test_every_readable_image_once_with_all_its_captions(data_set, file, tmp_path, capsys):
    out = tmp_path / "out"
    shards(data_set / file, out, "--samples-per-shard", "4", "--workers", "1")
    line = capsys.readouterr().out.strip()
    samples = read_shards(out)
    by_path = {json.loads(sample["json"])["path"]: sample for sample in samples.values()}
    assert sorted(by_path) == sorted(READABLE) and len(samples) == len(READABLE)  # each once, none lost
    for name, sample in by_path.items():
        meta = json.loads(sample["json"])
        assert meta["captions"] == CAPTIONS[name]
        assert meta["image_id"] == (str if file.endswith(".csv") else int)(IMAGE_IDS[name])  # as the file gives it
        assert sample["txt"].decode() == CAPTIONS[name][0]
        assert sorted(sample) == ["jpg", "json", "txt"]
        if name.endswith(".jpg"):  # a JPEG's bytes as they are
            assert sample["jpg"] == (data_set / "images" / name).read_bytes()
        else:  # re-encoded to JPEG from the same pixels
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.format == "JPEG"
                stored = np.asarray(image.convert("RGB"), dtype=float)
            original = np.asarray(Image.open(data_set / "images" / name).convert("RGB"), dtype=float)
            assert np.abs(stored - original).mean() < 2

    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 1]
    assert (manifest["images"], manifest["samples"], manifest["skipped"]) == (9, 6, 3)
    assert manifest["captions"] == sum(len(CAPTIONS[name]) for name in READABLE)
    assert manifest["source"] == str(data_set / file)
    assert {entry["path"]: entry["status"] for entry in manifest["skipped_images"]} == UNREADABLE
    for shard in manifest["shards"]:
        stats = json.loads((out / shard["name"].replace(".tar", "_stats.json")).read_text())
        assert stats["count"] == shard["count"] and stats["successes"] == shard["samples"]
        assert stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] == stats["count"]
        assert sum(stats["status_dict"].values()) == stats["count"]
    assert "\n" not in line and "6 sample(s)" in line and "3 skipped (1 failed_to_download, 2 failed_to_resize)" in line
    assert ("parquet tables skipped" in line) == (not shard_writer.parquet_available())
    assert (out / "00000.parquet").exists() == shard_writer.parquet_available()


def test_the_shards_read_back_with_the_training_reader(data_set, tmp_path):
    shards(data_set / "captions.json", tmp_path / "out", "--samples-per-shard", "4", "--workers", "1")
    dataset = TarShardDataset(sorted((tmp_path / "out").glob("*.tar")))
    samples = list(dataset)
    assert not any(isinstance(sample, Skipped) for sample in samples)
    assert sorted(sample["text"] for sample in samples) == sorted(clean_caption(CAPTIONS[n][0]) for n in READABLE)
    assert sorted(sample["image_id"] for sample in samples) == sorted(IMAGE_IDS[name] for name in READABLE)
    sideways = next(s for s in samples if s["image_id"] == IMAGE_IDS["sideways.jpg"])
    assert sideways["image"].size == (20, 40)  # the kept JPEG's EXIF orientation still applies


def test_the_training_reader_draws_one_of_all_the_captions_an_epoch(data_set, tmp_path):
    shards(data_set / "captions.jsonl", tmp_path / "out", "--workers", "1")
    dataset = TarShardDataset(sorted((tmp_path / "out").glob("*.tar")), caption_key="json:captions", shuffle_seed=0)
    drawn: dict[int, set[str]] = {}
    for epoch in range(8):
        dataset.epoch = epoch
        for sample in dataset:
            drawn.setdefault(sample["image_id"], set()).add(sample["text"])
    for name in READABLE:
        assert drawn[IMAGE_IDS[name]] <= {clean_caption(caption) for caption in CAPTIONS[name]}
    assert len(drawn[IMAGE_IDS["dog.jpg"]]) > 1  # not always the first


def test_two_workers_write_the_same_bytes_as_one(data_set, tmp_path):
    for workers in ("1", "2"):
        shards(data_set / "captions.jsonl", tmp_path / workers, "--samples-per-shard", "2", "--workers", workers)
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) == 5
    assert names == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name



@pytest.mark.parametrize("umask", [0o027, 0o000])
def test_every_file_has_the_mode_the_umask_gives(data_set, tmp_path, umask):
    """The tars, tables and manifest written by the worker processes and the parent get 0666
    less the umask of the command, as files written in place would (not mkstemp's 0600)."""
    old = os.umask(umask)
    try:
        shards(data_set / "captions.jsonl", tmp_path / "out", "--samples-per-shard", "4", "--workers", "2")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o666 & ~umask}, modes

def test_keep_bytes_keeps_a_png_as_it_is(data_set, tmp_path):
    shards(data_set / "captions.jsonl", tmp_path / "out", "--keep-bytes", "--workers", "1")
    car = next(s for s in read_shards(tmp_path / "out").values() if json.loads(s["json"])["path"] == "car.png")
    assert sorted(car) == ["json", "png", "txt"] and car["png"] == (data_set / "images" / "car.png").read_bytes()


@pytest.mark.skipif(not shard_writer.parquet_available(), reason="pyarrow is not installed (parquet is optional)")
def test_parquet_tables_name_every_image_and_why(data_set, tmp_path):
    import pyarrow.parquet as pq

    shards(data_set / "captions.jsonl", tmp_path / "out", "--workers", "1")
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [row["path"] for row in rows] == list(CAPTIONS)
    assert {row["path"]: row["status"] for row in rows if row["status"] != "success"} == UNREADABLE
    assert all((row["error_message"] is None) == (row["status"] == "success") for row in rows)
    assert [row["caption"] for row in rows] == [captions[0] for captions in CAPTIONS.values()]


def test_without_pyarrow_the_parquet_tables_are_skipped_and_said_so(data_set, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shard_writer, "parquet_available", lambda: False)
    shards(data_set / "captions.jsonl", tmp_path / "out", "--workers", "1")
    line = capsys.readouterr().out
    assert "parquet tables skipped: pyarrow is not installed" in line
    assert not list((tmp_path / "out").glob("*.parquet")) and (tmp_path / "out" / "00000_stats.json").is_file()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["parquet"] is False


def test_a_rerun_is_refused_unless_overwrite_which_replaces_the_old_shards(data_set, tmp_path, capsys):
    out = tmp_path / "out"
    shards(data_set / "captions.jsonl", out, "--samples-per-shard", "1", "--workers", "1")
    (out / "notes.txt").write_text("mine")
    (out / ".00003.tar.x1y2.tmp").write_bytes(b"left by a crash")
    with pytest.raises(SystemExit) as stop:
        shards(data_set / "captions.jsonl", out, "--workers", "1")
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count("\n") == 1 and "holds files already" in error and "--overwrite" in error
    shards(data_set / "captions.jsonl", out, "--workers", "1", "--overwrite")
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]  # the nine of the first run are gone
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".00003.tar.x1y2.tmp").exists()
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["count"] == 9


@pytest.mark.parametrize("arguments, message", [
    (["nope.json", "{out}"], "nope.json is not a file"),
    (["{data}/captions.json", "{out}", "--samples-per-shard", "0"], "--samples-per-shard must be at least 1, got 0"),
    (["{data}/captions.json", "{out}", "--workers", "0"], "--workers must be at least 1"),
    (["{data}/images/dog.jpg", "{out}"], "unknown caption file type '.jpg'"),
    (["{data}/captions.json", "{out}", "--image-root", "{data}/nowhere"], "nowhere is not a folder"),
    (["{data}/captions.json", "{data}/images/dog.jpg"], "dog.jpg is a file, not a folder"),
    (["{data}/captions.json", "{out}", "--image-root", "{data}"], "none of the first 9 image(s) is under"),
    (["{tmp}/empty.jsonl", "{out}"], "empty.jsonl: no captions in it"),
])
def test_mistakes_are_one_line(data_set, arguments, message, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    arguments = [a.format(data=data_set, out=tmp_path / "out", tmp=tmp_path) for a in arguments]
    with pytest.raises(SystemExit) as stop:
        main(["shards", *arguments])
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count("\n") == 1 and error.startswith("qformer shards: ")
    assert message in error, error
    assert not (tmp_path / "out").exists()  # nothing made
