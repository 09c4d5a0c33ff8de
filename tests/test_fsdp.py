"""FSDP2 in the trainer (``parallel: fsdp``), 2 processes on CPUs (gloo): the weights DDP
reaches, checkpoints in DDP's format that resume under either, evaluation on every rank, the
final model gathered whole; stage 2 with the LLM's blocks sharded and LoRA inside them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from qformer.pretrained.stage2 import Blip2
from qformer.objective import Stage1Objective
from qformer.train.config import load_train_config
from qformer.train.parallel import tower_blocks
from stage2_helpers import save_tiny_blip2
from test_train import TINY, free_port, torchrun, weights


def run(folder: Path, *overrides: str) -> Path:
    """The tiny recipe on 2 processes on CPUs, written to ``folder``."""
    process = torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                       overrides=["--output_dir", str(folder), "--device", "cpu", *overrides])
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    return folder


def logged(folder: Path, key: str, evaluation: bool = False) -> list:
    """``key`` of each line of ``metrics.jsonl``: the training lines, or the evaluation lines."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if ("loss" in line) != evaluation]


def test_parallel_is_checked():
    assert load_train_config(TINY).parallel == "ddp"
    assert load_train_config(TINY, ["--parallel", "fsdp"]).parallel == "fsdp"
    with pytest.raises(ValueError, match="parallel must be ddp or fsdp, got 'zero3'"):
        load_train_config(TINY, ["--parallel", "zero3"])


def test_units_are_the_frozen_towers_blocks(tmp_path):
    """Each image-encoder block and each LLM block is a unit; the Q-Former stays in the root."""
    from stage1_helpers import tiny_stage1

    stage1 = tiny_stage1()
    assert tower_blocks(Stage1Objective(stage1)) == list(reversed(stage1.vision.layers))
    save_tiny_blip2(tmp_path, "t5")
    model = Blip2.from_pretrained(tmp_path)
    blocks = tower_blocks(model)
    t5 = model.language_model
    expected = [*t5.encoder.block, *t5.decoder.block, *model.vision.layers]
    assert len(blocks) == len(expected) == 6 and {id(b) for b in blocks} == {id(b) for b in expected}
    assert not any(b is layer for b in blocks for layer in model.qformer.modules())


@pytest.mark.slow
def test_fsdp_reaches_ddps_weights_and_resumes(tmp_path):
    """Accumulation, clipping (a low limit, so that it acts), evaluation and the final model, as
    DDP; a checkpoint resumes under FSDP exactly and under DDP to float rounding."""
    recipe = ["--data.batch_size", "2", "--optim.grad_accum_steps", "2", "--optim.max_grad_norm", "0.05",
              "--eval_every", "6"]
    ddp = run(tmp_path / "ddp", *recipe)
    fsdp = run(tmp_path / "fsdp", *recipe, "--parallel", "fsdp")
    assert logged(fsdp, "loss") == pytest.approx(logged(ddp, "loss"), rel=1e-5)
    for step in (3, 6):
        a, b = weights(ddp, step), weights(fsdp, step)
        assert sorted(a) == sorted(b)
        for key in a:
            assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    # the optimiser state is stored whole, as DDP stores it
    state_a, state_b = (torch.load(r / "step_0000006" / "trainer.pt", weights_only=False)["optimizer"] for r in (ddp, fsdp))
    assert state_b["param_groups"] == state_a["param_groups"] and state_b["state"].keys() == state_a["state"].keys()
    for index, values in state_a["state"].items():
        for key, value in values.items():
            assert type(state_b["state"][index][key]) is torch.Tensor
            assert_close(state_b["state"][index][key], value, rtol=1e-5, atol=1e-5, msg=f"{index}.{key}")
    # the final stage-1 model, the frozen image encoder included, gathered whole
    final_a, final_b = (load_file(r / "final" / "model.safetensors") for r in (ddp, fsdp))
    assert sorted(final_a) == sorted(final_b) and any(k.startswith("vision.layers.0.") for k in final_b)
    for key in final_a:
        assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-5, msg=key)
    evaluation = json.loads((fsdp / "eval_step_0000006.json").read_text())
    assert evaluation == json.loads((ddp / "eval_step_0000006.json").read_text())
    assert evaluation["new_combinations/pairs"] == 32
    assert logged(fsdp, "step", evaluation=True) == [6]  # written once, by rank 0

    whole = weights(fsdp, 6)
    for parallel in ("fsdp", "ddp"):  # as if the FSDP run had died after step 3
        part = tmp_path / f"resumed_under_{parallel}"
        shutil.copytree(fsdp, part)
        shutil.rmtree(part / "step_0000006")
        shutil.rmtree(part / "final")
        run(part, *recipe, "--parallel", parallel, "--resume")
        resumed = weights(part, 6)
        assert sorted(resumed) == sorted(whole)
        for key in whole:
            if parallel == "fsdp":
                assert torch.equal(resumed[key], whole[key]), key
            else:
                assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-5, msg=key)
        assert logged(part, "step") == [1, 2, 3, 4, 5, 6] and logged(part, "step", evaluation=True) == [6]
    assert not torch.equal(weights(fsdp, 3)["query_tokens"], whole["query_tokens"])  # the run trained


@pytest.mark.slow
def test_fsdp_stage2_with_lora_in_the_sharded_llm(tmp_path):
    """A tiny T5 BLIP-2: LoRA adapters train inside the sharded LLM blocks; the losses follow
    DDP's; held-out captions are generated with every rank stepping together."""
    save_tiny_blip2(tmp_path / "blip2", "t5")
    recipe = ["--model.stage", "stage2", "--model.blip2", str(tmp_path / "blip2"), "--model.lora_r", "2",
              "--data.image_size", "28", "--data.batch_size", "2", "--steps", "2", "--save_every", "2",
              "--eval_every", "2"]
    ddp = run(tmp_path / "ddp", *recipe)
    fsdp = run(tmp_path / "fsdp", *recipe, "--parallel", "fsdp")
    assert logged(fsdp, "loss") == pytest.approx(logged(ddp, "loss"), rel=1e-5)
    a, b = weights(ddp, 2), weights(fsdp, 2)
    assert sorted(a) == sorted(b) and any("lora_A" in key for key in b)
    assert not any(key.startswith("language_model.") and "lora_" not in key for key in b)
    evaluation = json.loads((fsdp / "eval_step_0000002.json").read_text())
    assert evaluation.keys() == json.loads((ddp / "eval_step_0000002.json").read_text()).keys()
    assert 0 <= evaluation["new_images/exact_match"] <= 100 and logged(fsdp, "step", evaluation=True) == [2]
    # final/: rebuilt whole from the last checkpoint under FSDP: the trained weights exactly, LoRA merged
    final = Blip2.from_pretrained(fsdp / "final", dtype="float32")
    trained, start = dict(final.named_parameters()), dict(Blip2.from_pretrained(tmp_path / "blip2").named_parameters())
    assert trained.keys() == start.keys()
    for key, tensor in b.items():
        if "lora_" not in key:
            assert torch.equal(trained[key], tensor), key
    merged = [k for k in trained if k.startswith("language_model.") and not torch.equal(trained[k], start[k])]
    assert merged and all(k.endswith(".weight") for k in merged)


@pytest.mark.slow
def test_fsdp_trains_the_image_encoder_as_ddp(tmp_path):
    """``model.freeze_vit: false``: the encoder's blocks are sharded units that train (recomputed
    in backward, their lr scaled by layer); the weights DDP reaches, and final/ holds them."""
    recipe = ["--model.freeze_vit", "false", "--optim.layer_decay", "0.9", "--steps", "3"]
    ddp = run(tmp_path / "ddp", *recipe)
    fsdp = run(tmp_path / "fsdp", *recipe, "--parallel", "fsdp")
    a, b = weights(ddp, 3), weights(fsdp, 3)
    assert sorted(a) == sorted(b) and "vision.layers.0.mlp.fc1.weight" in a
    final = load_file(fsdp / "final" / "model.safetensors")
    for key in a:
        assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
        assert torch.equal(final[key], b[key]), key
