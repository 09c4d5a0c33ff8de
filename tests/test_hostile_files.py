"""Files from strangers: a run folder or checkpoint never executes a pickle, and a damaged file
is named in one line."""

import shutil
from pathlib import Path

import pytest
import torch
from test_train import TINY

from qformer.checkpoint import load_plain, write_checksums
from qformer.cli import main


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "run"
    main(["train", str(TINY), "--output_dir", str(folder), "--steps", "3", "--save_every", "3"])
    return folder


@pytest.mark.parametrize("name", ["trainer.pt", "rng_rank0.pt"])
def test_a_run_folder_that_would_run_code_is_refused(run, name, tmp_path, capsys):
    marker, copy = tmp_path / "ran", tmp_path / "run"
    shutil.copytree(run, copy)  # the shared run stays as trained
    torch.save({"step": 3, "x": Payload(marker)}, copy / "step_0000003" / name)
    write_checksums(copy / "step_0000003")  # a stranger's folder comes with checksums that match it
    with pytest.raises(SystemExit) as stop:
        main(["train", str(copy), "--resume", "--steps", "4"])
    assert stop.value.code == 1 and not marker.exists()
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and name in error and "refused to unpickle" in error and "could run code" in error


def test_damaged_torch_files_are_named(tmp_path):
    garbage, truncated, good = tmp_path / "garbage.pth", tmp_path / "truncated.pth", tmp_path / "good.pth"
    garbage.write_bytes(b"\x00 this is not a torch file" * 10)
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert torch.equal(load_plain(good)["model"]["w"], torch.load(good, weights_only=True)["model"]["w"])
    for path, message in ((garbage, "not a torch checkpoint, or a damaged one"),
                          (truncated, "damaged or truncated torch file")):
        with pytest.raises(ValueError) as err:
            load_plain(path)
        text = str(err.value)
        assert text.startswith(str(path)) and message in text and "could run code" not in text and "\n" not in text


def damaged_safetensors(good: Path, folder: Path) -> dict[str, Path]:
    import struct

    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "garbage": b"garbage " * 8,
             "oversized header": struct.pack("<Q", 10**12) + b"{}"}
    paths = {}
    for kind, content in files.items():
        paths[kind] = folder / kind.replace(" ", "_")
        paths[kind].mkdir()
        (paths[kind] / "model.safetensors").write_bytes(content)
    return paths


def test_damaged_safetensors_are_named(run, tmp_path):
    """Every reader of safetensors: a stage-1 directory, a training checkpoint's weights."""
    from qformer import Blip2Stage1
    from qformer.train.state import load_trainable

    good = run / "final" / "model.safetensors"
    for kind, folder in damaged_safetensors(good, tmp_path).items():
        (folder / "config.json").write_bytes((run / "final" / "config.json").read_bytes())
        with pytest.raises(ValueError) as err:
            Blip2Stage1.from_pretrained(folder)
        text = str(err.value)
        assert text.startswith(str(folder / "model.safetensors")) and "not a readable safetensors file" in text, kind
        (folder / "model.safetensors").rename(folder / "trainable.safetensors")
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            load_trainable(folder, Blip2Stage1.from_pretrained(run / "final"))


def test_a_checkpoint_of_another_shape_names_the_parameter(run, tmp_path):
    from safetensors.torch import load_file, save_file

    from qformer import Blip2Stage1
    from qformer.train.state import load_trainable

    weights = load_file(run / "step_0000003" / "trainable.safetensors")
    weights["query_tokens"] = torch.zeros(1, 7, weights["query_tokens"].shape[-1])
    save_file(weights, tmp_path / "trainable.safetensors")
    with pytest.raises(ValueError, match=r"query_tokens \(1, 7, 32\) vs the model's \(1, 4, 32\)"):
        load_trainable(tmp_path, Blip2Stage1.from_pretrained(run / "final"))


def test_a_checkpoint_of_two_processes_does_not_resume_on_one(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = copy / "step_0000003"
    shutil.copy(step / "rng_rank0.pt", step / "rng_rank1.pt")  # as two processes save it
    with pytest.raises(SystemExit) as stop:
        main(["train", str(copy), "--resume", "--steps", "4"])
    assert stop.value.code == 1
    assert "was saved by 2 process(es) and this run has 1: the global batch" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_caption_files_name_the_line_of_a_bad_byte_and_skip_blank_captions(suffix, tmp_path, caplog):
    import logging

    from qformer.data.datasets import read_captions

    rows = [("a.jpg", "a red car"), ("b.jpg", "   "), ("c.jpg", "caf\u00e9 tables")]
    if suffix == ".json":
        text = "[\n" + ",\n".join(f'{{"image": "{i}", "caption": "{c}"}}' for i, c in rows) + "\n]\n"
    elif suffix == ".jsonl":
        text = "".join(f'{{"image": "{i}", "caption": "{c}"}}\n' for i, c in rows)
    else:
        text = "image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows)
    good = tmp_path / f"good{suffix}"
    good.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        records = read_captions(good)
    assert [r.caption for r in records] == ["a red car", "caf\u00e9 tables"]  # the blank one left out
    assert any("1 caption(s) of whitespace only skipped" in r.getMessage() for r in caplog.records)

    latin = tmp_path / f"latin{suffix}"
    latin.write_bytes(text.encode("latin-1"))  # the é as the single byte 0xe9
    line = text[: text.index("caf")].count("\n") + 1
    with pytest.raises(ValueError, match=rf"latin{suffix}: line {line}: not UTF-8 text \(byte 0xe9"):
        read_captions(latin)


def test_instruction_jsonl_names_file_and_line(tmp_path):
    from qformer.data.datasets import read_instructions

    path = tmp_path / "instructions.jsonl"
    path.write_text('{"image": "a.jpg", "instruction": "describe", "answer": "a car"}\n{"image": "b.jpg", oops}\n')
    with pytest.raises(ValueError, match=r"instructions.jsonl: line 2: invalid JSON"):
        read_instructions(path)
