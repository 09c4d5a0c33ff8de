"""The image path exported (issue #29): every kind of model's graphs give PyTorch's outputs at the
traced batch and others, the runner preprocesses as eval_image does and imports no torch, stage-1
retrieval scores come from the graphs, torch.export's programs load and match, and the refusals
are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from qformer.cli import main
from qformer.config import ImageConfig
from qformer.data.transforms import eval_transform
from qformer.export.writer import export_directory, export_model
from qformer.loading import model_fingerprint
from qformer.onnx import ExportedModel, itc_scores
from qformer.pretrained.stage1 import extract_features, image_embeds_of
from qformer.pretrained.stage2 import Blip2
from stage1_helpers import IMAGE, tiny_stage1, tiny_stage1_config, usable_stage1
from stage2_helpers import save_tiny_blip2, tiny_tokenizer

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.numerics
KINDS = ("opt", "t5", "instructblip", "stage1", "clip-tower")
TEXTS = ["a photo of a cat", "two dogs on the grass", "a red car"]


def photos(count: int) -> list[Image.Image]:
    """Images of other sizes than the model's, one with transparency, so that decoding and
    resizing are part of what is compared."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 45, 3), dtype=np.uint8)) for i in range(count)]
    images[-1] = images[-1].convert("RGBA")
    return images


def save_instructblip(directory: Path) -> None:
    from test_instructblip import tiny_transformers_instructblip

    tiny_transformers_instructblip("llama").save_pretrained(directory)
    tiny_tokenizer(add_bos=True).save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")


def clip_tower_stage1():
    """Stage 1 in front of a transformers vision tower (CLIP), built in memory."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from qformer.models.vision import TransformersVisionTower
    from qformer.pretrained.stage1 import Blip2Stage1

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=IMAGE, patch_size=14))
    config = tiny_stage1_config(vision=False).replace(image=ImageConfig(size=IMAGE).to_dict())
    reference = tiny_stage1()
    model = Blip2Stage1(config, vision=TransformersVisionTower(clip)).eval()
    model.load_state_dict(reference.state_dict(), strict=False)  # lively Q-Former weights; the tower is CLIP's
    return model


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory, minilm_path):
    """kind -> (model in PyTorch, export folder), built once per kind on first use."""
    from transformers import AutoTokenizer

    cache: dict[str, tuple] = {}

    def get(kind: str) -> tuple:
        if kind in cache:
            return cache[kind]
        root = tmp_path_factory.mktemp(kind)
        source, out = root / "model", root / "onnx"
        if kind in ("opt", "t5"):
            save_tiny_blip2(source, kind)
            main(["export", str(source), str(out), "--format", "onnx"])  # through the command line
            model = Blip2.from_pretrained(source)
        elif kind == "instructblip":
            save_instructblip(source)
            export_directory(source, out)
            model = Blip2.from_pretrained(source)
        elif kind == "stage1":
            usable_stage1(AutoTokenizer.from_pretrained(str(minilm_path))).save_pretrained(source)
            export_directory(source, out)
            from qformer.pretrained.stage1 import Blip2Stage1
            model = Blip2Stage1.from_pretrained(source)
        else:
            model = clip_tower_stage1()
            export_model(model, out)
        cache[kind] = (model.eval(), out, source)
        return cache[kind]

    return get


def instruction(model, batch: int) -> dict[str, np.ndarray]:
    """A left-padded instruction batch (the graph re-pads it to the right, as the model does)."""
    prompts = ["what colour is it", "question : what is on the mat", "a photo of"][:batch]
    tokens = model.qformer_tokenizer(prompts, padding=True, padding_side="left", return_tensors="np")
    return {"qformer_input_ids": tokens["input_ids"].astype(np.int64),
            "qformer_attention_mask": tokens["attention_mask"].astype(np.int64)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 3])  # traced at 2
def test_graphs_equal_pytorch(exported, kind: str, batch: int) -> None:
    model, out, _ = exported(kind)
    runner = ExportedModel(out)
    images = photos(batch)
    with torch.no_grad():
        if kind in ("stage1", "clip-tower"):
            features = extract_features(model, image_embeds_of(model, images))
            got = runner.run("image_features", pixel_values=runner.preprocess(images))
            assert_close(torch.from_numpy(got["image_features"]), features.image, atol=1e-4, rtol=0)
            hidden = model.query_pass(model.qformer.encoder_key_values(image_embeds_of(model, images)))
            assert_close(torch.from_numpy(got["query_output"]), hidden.last_hidden_state, atol=1e-4, rtol=0)
            return
        extra = instruction(model, batch) if kind == "instructblip" else {}
        tensors = {name: torch.from_numpy(value) for name, value in extra.items()}
        expected = model.language_model_inputs(model.image_embeds(model.preprocess(images)), **tensors)
    got = runner.image_prefix(images, **extra)
    assert got.shape == (batch, model.num_query_tokens, model.language_projection.out_features)
    assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


def test_runner_preprocesses_as_eval_image(exported) -> None:
    model, out, _ = exported("stage1")  # its mean and std are not CLIP's
    images = photos(3)
    assert_close(torch.from_numpy(ExportedModel(out).preprocess(images)), eval_transform(images, model.config.image),
                 atol=1e-6, rtol=0)


def test_runner_imports_no_torch() -> None:
    code = "import sys, qformer.onnx; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_retrieval_scores_from_the_graphs_equal_itc_scores(exported) -> None:
    """Retrieval's first pass from the exported graphs, texts tokenised by the copied tokenizer
    with the tokenizers library alone (no torch, no transformers)."""
    from tokenizers import Tokenizer

    model, out, _ = exported("stage1")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.enable_truncation(32)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
    encoded = tokenizer.encode_batch(TEXTS)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    runner = ExportedModel(out)
    images = photos(2)
    scores = itc_scores(runner.image_features(images), runner.text_features(ids, mask))
    assert_close(torch.from_numpy(scores), model.itc_scores(images, TEXTS), atol=1e-4, rtol=0)


def test_export_json_describes_the_folder(exported) -> None:
    model, out, source = exported("opt")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == "onnx" and manifest["kind"] == "blip2" and manifest["opset"] == 18
    assert manifest["dtype"] == "float32" and manifest["source"]["fingerprint"] == model_fingerprint(source)
    image = model.config.image
    assert manifest["image"]["size"] == image.size and manifest["image"]["mean"] == list(image.mean)
    graph = manifest["graphs"]["image_prefix"]
    assert graph["inputs"] == [{"name": "pixel_values", "shape": ["batch", 3, image.size, image.size],
                                "dtype": "float32"}]
    width = model.language_projection.out_features
    assert graph["outputs"] == [{"name": "language_model_inputs", "shape": ["batch", model.num_query_tokens, width],
                                 "dtype": "float32"}]
    assert manifest["language_model"] == {"model_type": "opt", "is_encoder_decoder": False, "hidden_size": width}
    assert graph["files"]["image_prefix.onnx"] == (out / "image_prefix.onnx").stat().st_size
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": image.size,
                                                                                "width": image.size}
    assert (out / "tokenizer.json").is_file()
    _, instruct_out, _ = exported("instructblip")
    assert (instruct_out / "qformer_tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("kind", ["opt", "stage1"])
def test_torch_export_program_loads_and_matches(exported, tmp_path: Path, kind: str) -> None:
    model, _, source = exported(kind)
    out = export_directory(source, tmp_path / "pt2", format="torch-export")
    assert json.loads((out / "export.json").read_text())["format"] == "torch-export"
    name = "image_features" if kind == "stage1" else "image_prefix"
    program = torch.export.load(out / f"{name}.pt2").module()
    for batch in (1, 3):
        pixels = eval_transform(photos(batch), model.config.image)
        with torch.no_grad():
            got = program(pixels)
            if kind == "stage1":
                assert_close(got[0], extract_features(model, model.image_embeds(pixels)).image, atol=1e-4, rtol=0)
            else:
                assert_close(got, model.language_model_inputs(model.image_embeds(pixels)), atol=1e-4, rtol=0)


def test_float16_graph_runs_on_the_cpu(exported, tmp_path: Path) -> None:
    _, _, source = exported("opt")
    out = export_directory(source, tmp_path / "fp16", dtype="fp16")
    model = Blip2.from_pretrained(source, dtype="float16")
    images = photos(3)
    with torch.no_grad():
        expected = model.language_model_inputs(model.image_embeds(model.preprocess(images)))
    got = ExportedModel(out).image_prefix(images)
    assert got.dtype == np.float16 and json.loads((out / "export.json").read_text())["dtype"] == "float16"
    assert_close(torch.from_numpy(got), expected, atol=2e-2, rtol=0)  # fp16 kernels of two runtimes


def test_refusals_are_one_line(exported, tmp_path: Path, capsys) -> None:
    _, out, source = exported("opt")
    with pytest.raises(SystemExit):
        main(["export", str(source), str(tmp_path / "x"), "--format", "onnx", "--dtype", "bf16"])
    with pytest.raises(SystemExit):
        main(["export", str(source), str(out), "--format", "onnx"])  # not empty, no --overwrite
    with pytest.raises(ValueError, match="has no image encoder"):
        export_model(tiny_stage1(vision=False), tmp_path / "y")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["qformer export: --dtype bfloat16 cannot be exported as onnx: onnxruntime lacks bfloat16 "
                     "kernels for the image path's operators; use float32 or float16",
                     f"qformer export: {out} exists and is not empty: choose another directory or pass --overwrite"]


def test_a_failed_trace_leaves_no_folder(exported, tmp_path: Path, monkeypatch) -> None:
    from qformer.export import graphs

    model, _, _ = exported("opt")

    def untraceable(self, pixel_values):
        return self.model.project(self.model.query_tokens.expand(int(pixel_values.sum() > 0) + 1, -1, -1))

    monkeypatch.setattr(graphs.ImagePrefix, "forward", untraceable)
    with pytest.raises(ValueError, match="^cannot trace Blip2's image_prefix with torch.export: "):
        export_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_move_padding_is_a_stable_sort_of_the_mask() -> None:
    """InstructBLIP's instruction re-padding, computed by counting so that ONNX can hold it, gives
    what a stable sort gives for every mask."""
    from qformer.models.blip2 import move_padding

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = (torch.rand(4, 9, generator=generator) > 0.4).long()
        ids = torch.randint(0, 99, (4, 9), generator=generator)
        for side, key in (("left", mask), ("right", 1 - mask)):
            order = torch.sort(key, dim=1, stable=True).indices
            moved = move_padding(ids, mask.bool(), side)
            assert torch.equal(moved[0], ids.gather(1, order)) and torch.equal(moved[1], mask.bool().gather(1, order))
