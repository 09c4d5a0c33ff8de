"""``qformer convert``: round trips between LAVIS .pth files, transformers directories and ours
(tiny models built here), refusal of pickled code, unknown keys, and the CLI."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2ForImageTextRetrieval

from qformer.cli.convert import add_convert_command
from qformer.convert.transformers_blip2 import blip2_config_from_transformers
from qformer.pretrained.conversion import convert
from qformer.pretrained.lavis import read_lavis_pth
from stage1_helpers import tiny_stage1
from stage2_helpers import IMAGE_TOKEN, save_tiny_blip2

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

LM_HEAD = {"qformer.lm_head.bias", "qformer.lm_head.dense.bias", "qformer.lm_head.dense.weight",
           "qformer.lm_head.norm.bias", "qformer.lm_head.norm.weight"}
LAVIS_LLM = {"opt": ("opt_proj", "opt_model"), "t5": ("t5_proj", "t5_model")}


def assert_same_tensors(got: dict, expected: dict, skip: set = frozenset()) -> None:
    assert sorted(got) == sorted(expected)
    unequal = [k for k in expected if k not in skip and not torch.equal(got[k], expected[k])]
    assert unequal == []


def no_temporary_files(path: Path) -> bool:
    return not any(p.name.startswith(".") for p in path.iterdir())


def run_cli(*argv: str) -> None:
    """``qformer convert ...`` through a parser of our own (qformer.cli registers the same command)."""
    parser = argparse.ArgumentParser(prog="qformer")
    add_convert_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *map(str, argv)])
    args.run(args)


@pytest.fixture
def stage1_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "stage1"
    tiny_stage1().save_pretrained(directory)
    return directory


def test_stage1_ours_lavis_ours_is_exact(stage1_dir: Path, tmp_path: Path) -> None:
    pth = tmp_path / "blip2_stage1.pth"
    _, written = convert(stage1_dir, pth)
    assert written.dropped == {} and written.unmatched == []
    lavis = read_lavis_pth(pth)
    for key in ("visual_encoder.blocks.1.attn.q_bias", "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                "Qformer.cls.predictions.decoder.weight", "itm_head.weight", "temp"):
        assert key in lavis, key
    read, _ = convert(pth, tmp_path / "back", config=stage1_dir / "config.json")
    assert sorted(read.dropped) == ["Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.decoder.weight"]
    assert_same_tensors(load_file(tmp_path / "back" / "model.safetensors"), load_file(stage1_dir / "model.safetensors"))
    configs = [json.loads((d / "config.json").read_text()) for d in (tmp_path / "back", stage1_dir)]
    assert configs[0] == configs[1]
    assert no_temporary_files(tmp_path / "back") and no_temporary_files(tmp_path)


def test_stage1_image_encoder_from_elsewhere(stage1_dir: Path, tmp_path: Path) -> None:
    """LAVIS's released files lack the frozen EVA ViT: it comes from --vision, e.g. a bare EVA
    state dict with one block more than BLIP-2 uses (as eva_vit_g.pth: 40 for 39)."""
    convert(stage1_dir, tmp_path / "full.pth")
    lavis = read_lavis_pth(tmp_path / "full.pth")
    vision = {k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    eva = {**vision, **{k.replace("blocks.1.", "blocks.2."): v for k, v in vision.items() if "blocks.1." in k},
           "norm.weight": torch.ones(24)}
    torch.save(eva, tmp_path / "eva.pth")
    released = tmp_path / "released.pth"
    torch.save({"model": {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}, "epoch": 3}, released)
    config = stage1_dir / "config.json"
    with pytest.raises(ValueError, match=r"no image encoder weights \(visual_encoder.\*\).*--vision"):
        convert(released, tmp_path / "fails", config=config)
    for donor in (tmp_path / "eva.pth", stage1_dir):
        out = tmp_path / f"from_{donor.stem}"
        read, _ = convert(released, out, config=config, vision=donor)
        assert_same_tensors(load_file(out / "model.safetensors"), load_file(stage1_dir / "model.safetensors"))
        if donor.suffix == ".pth":  # EVA's block past the config's two and its final norm: reported, not used
            assert {"vision.layers.2.attn.qkv.weight", "visual_encoder.norm.weight"} <= set(read.dropped)


def test_stage1_ours_transformers_ours(stage1_dir: Path, tmp_path: Path) -> None:
    """transformers' retrieval model has no Q-Former LM head and no temperature: they are
    reported on the way there and come back fresh; everything else is exact."""
    _, written = convert(stage1_dir, tmp_path / "hf", to="transformers")
    assert set(written.dropped) == LM_HEAD | {"temp"}  # one LayerNorm eps from the start
    reference, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_tensors(reference.state_dict(), load_file(tmp_path / "hf" / "model.safetensors"))
    read, _ = convert(tmp_path / "hf", tmp_path / "back", to="qformer")
    assert set(read.dropped) == LM_HEAD | {"temp"}
    assert all("fresh" in why for why in read.dropped.values())
    original = load_file(stage1_dir / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert_same_tensors(back, original, skip=LM_HEAD | {"temp"})
    assert not torch.equal(back["qformer.lm_head.dense.weight"], original["qformer.lm_head.dense.weight"])


@pytest.fixture(params=["opt", "t5"])
def blip2_dirs(request, tmp_path: Path) -> tuple[str, Path, Path]:
    """A transformers BLIP-2 directory (the key bias of the vision qkv zero, as in EVA) and its
    LLM's own transformers directory."""
    llm, directory = request.param, tmp_path / "blip2"
    model = save_tiny_blip2(directory, llm)
    weights = load_file(directory / "model.safetensors")
    for key in [k for k in weights if k.endswith("self_attn.qkv.bias")]:
        weights[key] = weights[key].clone()
        weights[key].chunk(3)[1].zero_()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    model.language_model.save_pretrained(tmp_path / "llm")
    (tmp_path / "llm" / "tokenizer_config.json").write_text((directory / "tokenizer_config.json").read_text())
    (tmp_path / "llm" / "tokenizer.json").write_text((directory / "tokenizer.json").read_text())
    return llm, directory, tmp_path / "llm"


def released_copy(lavis: dict, llm_prefix: str, path: Path) -> None:
    """What LAVIS releases: no frozen LLM or image encoder, and (some versions) the unused text
    path of the Q-Former and its position ids."""
    kept = {k: v for k, v in lavis.items() if not k.startswith((f"{llm_prefix}.", "visual_encoder."))}
    kept["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(50, 32)
    kept["Qformer.bert.embeddings.position_ids"] = torch.arange(40)[None]
    kept["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(48, 32)
    kept["Qformer.bert.encoder.layer.2.output.LayerNorm.bias"] = torch.randn(32)
    torch.save({"model": kept, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)


def our_partial_config(directory: Path, path: Path) -> Path:
    """qformer's JSON with only what differs from BLIP-2's official values."""
    values = json.loads((directory / "config.json").read_text())
    q = values["qformer_config"]
    path.write_text(json.dumps({
        "vision": {k: values["vision_config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                             "num_attention_heads", "image_size", "patch_size")},
        "qformer": {k: q[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                      "intermediate_size", "max_position_embeddings", "encoder_hidden_size")}
        | {"bos_token_id": None},
        "num_query_tokens": values["num_query_tokens"],
        "image_token_index": IMAGE_TOKEN,
        "ln_vision_eps": 1e-5,  # LAVIS's: transformers' layout has no place for it
    }))
    return path


def test_stage2_transformers_lavis_transformers(blip2_dirs, tmp_path: Path) -> None:
    llm, directory, llm_dir = blip2_dirs
    projection, llm_prefix = LAVIS_LLM[llm]
    _, written = convert(directory, tmp_path / "blip2.pth")
    lavis = read_lavis_pth(tmp_path / "blip2.pth")
    for key in (f"{projection}.weight", "visual_encoder.blocks.0.attn.v_bias", "ln_vision.bias", "query_tokens",
                "Qformer.bert.encoder.layer.0.crossattention.self.query.weight",
                "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"):
        assert key in lavis, key
    assert any(k.startswith(f"{llm_prefix}.") for k in lavis) and written.unmatched == []
    assert not any(k.startswith("Qformer.cls.") or ".intermediate." in k for k in lavis)

    released = tmp_path / "released.pth"
    released_copy(lavis, llm_prefix, released)
    config = directory / "config.json" if llm == "opt" else our_partial_config(directory, tmp_path / "ours.json")
    missing_llm = rf"(no LLM weights \({llm_prefix}\.\*\)|the LLM's architecture is unknown).*--llm"
    with pytest.raises(ValueError, match=missing_llm):
        convert(released, tmp_path / "fails", to="transformers", config=config, vision=directory)
    out = tmp_path / "back"
    read, written = convert(released, out, to="transformers", config=config, llm=llm_dir, vision=directory)
    assert_same_tensors(load_file(out / "model.safetensors"), load_file(directory / "model.safetensors"))
    for key in ("Qformer.bert.embeddings.word_embeddings.weight",
                "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                "Qformer.bert.encoder.layer.2.output.LayerNorm.bias"):
        assert "text path" in read.dropped[key]
    assert "Qformer.bert.embeddings.position_ids" in read.dropped
    assert "vision_model.post_layernorm.weight" in read.dropped  # the donor's: LAVIS's ln_vision is kept
    assert all("tied" in why for key, why in written.dropped.items() if key.startswith("language_model."))
    assert ("config.ln_vision_eps" in written.dropped) == (llm == "t5")  # our JSON asks for LAVIS's 1e-5
    source, result = (blip2_config_from_transformers(json.loads((d / "config.json").read_text()))
                      for d in (directory, out))
    for field in ("vision", "qformer", "num_query_tokens", "ln_vision_eps", "image_token_index", "image"):
        assert getattr(result, field) == getattr(source, field), field
    assert (out / "tokenizer_config.json").is_file() and no_temporary_files(out)

    with_surprise = {**lavis, "Qformer.bert.encoder.layer.0.surprise.weight": torch.zeros(1)}
    torch.save({"model": with_surprise}, tmp_path / "surprise.pth")
    with pytest.raises(KeyError, match="Qformer.bert.encoder.layer.0.surprise.weight"):
        convert(tmp_path / "surprise.pth", tmp_path / "never", config=config, llm=llm_dir)


class Payload:
    """Unpickling it opens (creates) ``marker`` for writing: code run by the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    live, refused = tmp_path / "live", tmp_path / "refused"
    torch.save({"model": {"x": Payload(live)}}, tmp_path / "live.pth")
    torch.load(tmp_path / "live.pth", weights_only=False)  # the payload is real:
    assert live.exists()
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"itm_head.weight": torch.zeros(2, 32), "x": Payload(refused)}}, evil)
    with pytest.raises(ValueError, match="refused to unpickle") as err:
        read_lavis_pth(evil)
    assert str(evil) in str(err.value) and "plain tensors" in str(err.value) and "weights_only=True" in str(err.value)
    with pytest.raises(ValueError, match="could run code"):
        run_cli(evil, tmp_path / "out")
    assert not refused.exists() and not (tmp_path / "out").exists()


def test_cli_end_to_end(stage1_dir: Path, tmp_path: Path, capsys) -> None:
    run_cli(stage1_dir, tmp_path / "stage1.pth")
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'stage1.pth'} (lavis)" in printed and "dropped 0 key(s)" in printed
    run_cli(tmp_path / "stage1.pth", tmp_path / "back", "--to", "qformer", "--config", stage1_dir / "config.json")
    printed = capsys.readouterr().out
    assert "Qformer.cls.predictions.decoder.weight: tied to the word embeddings" in printed
    assert_same_tensors(load_file(tmp_path / "back" / "model.safetensors"), load_file(stage1_dir / "model.safetensors"))

    lavis = read_lavis_pth(tmp_path / "stage1.pth")
    torch.save({"model": {**lavis, "Qformer.bert.surprise": torch.zeros(1)}}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match=r"(?s)no place here:.*Qformer\.bert\.surprise"):
        run_cli(tmp_path / "unknown.pth", tmp_path / "never", "--config", stage1_dir / "config.json")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="--llm: only for LAVIS"):
        run_cli(stage1_dir, tmp_path / "x.pth", "--llm", tmp_path)
    with pytest.raises(ValueError, match="stage-1 LAVIS checkpoint"):
        run_cli(tmp_path / "stage1.pth", tmp_path / "y", "--llm", tmp_path)
    with pytest.raises(ValueError, match="writes a directory"):
        run_cli(stage1_dir, tmp_path / "stage1.pth", "--to", "transformers")
