"""`qformer caption` / `qformer vqa` as users call them: many images (files, folders, globs),
batches, devices and dtypes, unreadable images, and the mistakes people make."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from qformer.cli import main
from qformer.pretrained.stage2 import Blip2
from stage2_helpers import save_tiny_blip2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("blip2-opt")
    save_tiny_blip2(directory, "opt")
    return directory


@pytest.fixture
def photos(tmp_path):
    """A folder of 3 pictures (one in a sub-folder), a file that is not an image, a text file."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.jpg", "blue"), ("more/c.png", "green")):
        Image.new("RGB", (40, 30), colour).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image either")
    return folder


def run(args, capsys):
    """The command in this process: (exit status, stdout lines, stderr)."""
    try:
        main(args)
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out.splitlines(), out.err


def test_folders_globs_and_unreadable_images(model_dir, photos, capsys):
    status, lines, err = run(["caption", "--model", str(model_dir), "--json", "--max-new-tokens", "3",
                              "--batch-size", "2", str(photos / "missing.png"), str(photos),
                              str(photos / "**" / "*.png")], capsys)
    rows = [json.loads(line) for line in lines]
    by_image = {row["image"]: row for row in rows}
    # in the order given: the file, the folder's images (sorted), the glob's that were not named already
    assert [row["image"] for row in rows] == [str(photos / n) for n in (
        "missing.png", "a.png", "b.jpg", "broken.jpg", "more/c.png")]
    assert "cannot read image" in by_image[str(photos / "broken.jpg")]["error"]
    assert "cannot read image" in by_image[str(photos / "missing.png")]["error"]
    answered = [row for row in rows if "caption" in row]
    assert len(answered) == 3 and all(isinstance(row["caption"], str) for row in answered)
    assert status == 1 and "2 of 5 image(s) could not be read" in err

    # the same captions one image at a time, and from the Python API
    status, alone, _ = run(["caption", "--model", str(model_dir), "--json", "--max-new-tokens", "3",
                            "--batch-size", "1", str(photos / "a.png"), str(photos / "b.jpg")], capsys)
    assert status == 0 and [json.loads(line) for line in alone] == answered[:2]
    api = Blip2.from_pretrained(model_dir).caption([photos / "a.png"], max_new_tokens=3)
    assert api[0] == answered[0]["caption"]


def test_plain_output_vqa_and_half_precision(model_dir, photos, capsys):
    status, lines, _ = run(["vqa", "--model", str(model_dir), "--question", "what colour is it", "--device", "cpu",
                            "--dtype", "bf16", "--max-new-tokens", "2", str(photos / "a.png")], capsys)
    assert status == 0 and len(lines) == 1 and lines[0].startswith(f"{photos / 'a.png'}\t")
    status, lines, _ = run(["vqa", "--model", str(model_dir), "--question", "what colour is it", "--json",
                            "--dtype", "torch.float16", "--max-new-tokens", "2", str(photos / "a.png")], capsys)
    assert status == 0 and json.loads(lines[0])["question"] == "what colour is it"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "gpu"], "unknown device 'gpu': use cpu, cuda, cuda:N or mps"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-beams", "0"], "--num-beams must be at least 1, got 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
        (["--device", "cpu", "--device-map", "auto"], "pass --device or --device-map, not both"),
        (["--device-map", "disk"], "unknown device 'disk'"),
    ],
)
def test_bad_values_are_one_line(model_dir, photos, capsys, options, message):
    status, lines, err = run(["caption", "--model", str(model_dir), *options, str(photos / "a.png")], capsys)
    assert status == 1 and not lines
    assert len(err.strip().splitlines()) == 1 and err.startswith("qformer caption: ")
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_missing_cuda_is_one_line_from_a_fresh_process(model_dir, photos):
    out = subprocess.run([sys.executable, "-m", "qformer", "caption", "--model", str(model_dir), "--device", "cuda",
                          str(photos / "a.png")], capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("qformer caption: device 'cuda': CUDA is not available (")


def test_nothing_to_read_and_no_model(model_dir, photos, tmp_path, capsys):
    status, _, err = run(["caption", "--model", str(model_dir), str(tmp_path / "none-*.png")], capsys)
    assert status == 1 and "none-*.png: no file matches" in err and "no images to read" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run(["caption", "--model", str(model_dir), str(empty)], capsys)
    assert status == 1 and "no image files in this folder" in err
    status, _, err = run(["caption", "--model", str(tmp_path / "nope"), str(photos / "a.png")], capsys)
    assert status == 1 and "not a local directory" in err


def test_load_pretrained_tells_the_kind_and_vqa_needs_stage2(model_dir, photos, tmp_path, capsys):
    """qformer.load_pretrained picks the class from config.json, as the commands do; vqa says in
    one line that a stage-1 model has no LLM to answer with."""
    from qformer import Blip2Stage1, InstructBlip, load_pretrained
    from qformer.pretrained.auto import find_model
    from stage1_helpers import tiny_stage1

    stage2 = load_pretrained(model_dir, dtype="float32", device="cpu")
    assert type(stage2) is Blip2 and not isinstance(stage2, InstructBlip)
    tiny_stage1().save_pretrained(tmp_path / "stage1")
    assert find_model(tmp_path / "stage1").kind == "stage1" and find_model(model_dir).kind == "blip2"
    assert isinstance(load_pretrained(tmp_path / "stage1"), Blip2Stage1)
    with pytest.raises(ValueError, match="quantization_config are for stage-2 models"):
        load_pretrained(tmp_path / "stage1", quantization_config={})
    status, lines, err = run(["vqa", "--model", str(tmp_path / "stage1"), "--question", "what?",
                              str(photos / "a.png")], capsys)
    assert status == 1 and not lines and len(err.strip().splitlines()) == 1
    assert "holds a stage-1 model (image-text matching, no LLM): vqa answers with a stage-2 model" in err
