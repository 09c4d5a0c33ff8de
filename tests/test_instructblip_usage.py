"""InstructBLIP through qformer.Blip2.from_pretrained, answer() and `qformer vqa`."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qformer.cli import main
from qformer.pretrained.stage2 import Blip2, InstructBlip
from stage2_helpers import tiny_tokenizer, with_image_tokens
from test_instructblip import tiny_transformers_instructblip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("instructblip-llama")
    ref = tiny_transformers_instructblip("llama")
    ref.save_pretrained(directory)
    tiny_tokenizer(add_bos=True).save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")
    return directory, ref


def images(tmp_path):
    paths = []
    for i, colour in enumerate(["red", "blue"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    return paths


def test_from_pretrained_recognises_instructblip(saved):
    directory, _ = saved
    model = Blip2.from_pretrained(directory)
    assert isinstance(model, InstructBlip) and isinstance(model, Blip2)
    assert model.config.qformer.use_text_input
    assert model.qformer_tokenizer is not None and model.qformer_tokenizer.truncation_side == "left"


def test_answer_equals_transformers_with_the_instruction(saved, tmp_path):
    directory, ref = saved
    model = Blip2.from_pretrained(directory)
    paths = images(tmp_path)
    questions = ["what colour is it", "is it a red ball"]
    answers = model.answer(paths, questions, max_new_tokens=4, num_beams=1, min_new_tokens=0)
    prompts = [f"Question: {q} Answer:" for q in questions]
    for row, prompt in enumerate(prompts):  # transformers, one image at a time, same pixels and ids
        text = model.tokenizer([prompt], return_tensors="pt")
        ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
        q = model.qformer_tokenizer([prompt], return_tensors="pt")
        expected = ref.generate(pixel_values=model.preprocess(paths[row : row + 1]), input_ids=ids, attention_mask=mask,
                                qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask,
                                max_new_tokens=4, eos_token_id=model.stop_token_ids(), pad_token_id=0)
        decoded = model.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert answers[row] == decoded


def test_save_and_reload_keeps_both_tokenizers(saved, tmp_path):
    directory, _ = saved
    model = Blip2.from_pretrained(directory)
    model.save_pretrained(tmp_path / "copy")
    again = Blip2.from_pretrained(tmp_path / "copy")
    assert isinstance(again, InstructBlip) and again.qformer_tokenizer is not None
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_cli_vqa_with_an_instruction_model(saved, tmp_path, capsys):
    directory, _ = saved
    image = images(tmp_path)[0]
    capsys.readouterr()
    main(["vqa", "--model", str(directory), "--question", "what colour is it", "--json", "--max-new-tokens", "3",
          str(image)])  # returns: exit status 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["question"] == "what colour is it"


def test_instruction_tuning_run(saved, tmp_path):
    """`qformer train` on instruction data (JSONL: image, instruction, answer) with an
    InstructBLIP directory: the loss falls on the answers only and the Q-Former trains."""
    from qformer.train.config import load_train_config
    from qformer.train.loop import train
    from qformer.train.stage2_job import Stage2Collator

    directory, _ = saved
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (28, 28), colour).save(data / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "instruction": "what colour is it", "answer": colour}))
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    config = load_train_config(None, [
        "--model.stage", "stage2", "--model.blip2", str(directory), "--data.source", "instructions",
        "--data.path", str(data / "train.jsonl"), "--data.image_root", str(data), "--data.image_size", "28",
        "--data.batch_size", "2", "--data.num_workers", "0", "--steps", "4", "--optim.warmup_steps", "1",
        "--optim.lr", "1e-3", "--log_every", "1", "--output_dir", str(tmp_path / "run")])
    result = train(config)
    assert result["step"] == 4 and torch.isfinite(torch.tensor(result["loss"]))
    trained = load_file(tmp_path / "run" / "step_0000004" / "trainable.safetensors")
    assert "qformer.embeddings.word.weight" in trained  # the instruction path trains
    assert not any(k.startswith("language_model.") for k in trained)
    # labels: the LLM's loss covers the answer (and its eos), never the instruction
    model = Blip2.from_pretrained(directory)
    batch = Stage2Collator(model, "", 32, 0)([{"image": torch.zeros(3, 28, 28), "instruction": "what colour is it",
                                               "text": "red", "image_id": 0}])
    answer = model.tokenizer("red</s>", add_special_tokens=False).input_ids
    assert [t for t in batch["labels"][0].tolist() if t != -100] == answer
    assert batch["qformer_input_ids"].shape[0] == 1


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_convert_instructblip_through_lavis_is_exact(llm, tmp_path):
    """transformers InstructBLIP -> LAVIS .pth (Blip2VicunaInstruct / Blip2T5Instruct layout)
    -> transformers: every tensor equal."""
    from transformers import InstructBlipForConditionalGeneration

    from qformer.pretrained.conversion import convert
    from qformer.pretrained.lavis import read_lavis_pth

    ref = tiny_transformers_instructblip(llm)
    with torch.no_grad():  # EVA's key bias is zero (LAVIS stores q_bias and v_bias only)
        for layer in ref.vision_model.encoder.layers:
            width = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[width : 2 * width] = 0
    ref.save_pretrained(tmp_path / "hf")
    tiny_tokenizer(add_bos=llm != "t5").save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "instruct.pth", to="lavis")
    state = read_lavis_pth(tmp_path / "instruct.pth")
    projection = "llm_proj.weight" if llm == "llama" else "t5_proj.weight"
    assert projection in state and "Qformer.bert.embeddings.word_embeddings.weight" in state
    model = Blip2.from_pretrained(tmp_path / "hf")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    model.language_model.save_pretrained(tmp_path / "llm")
    convert(tmp_path / "instruct.pth", tmp_path / "back", to="transformers", config=tmp_path / "config.json",
            llm=tmp_path / "llm")
    back = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    original = ref.state_dict()
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_mixed_instruction_sets_feed_the_trainer(saved, tmp_path):
    """`data.sets`: the job's batches draw from both sets as their SetMixture says."""
    from qformer.train.batches import data_batches
    from qformer.train.build import build_job
    from qformer.train.config import load_train_config
    from qformer.train.distributed import Runtime

    directory, _ = saved
    sets = []
    for colour, count in (("red", 2), ("blue", 6)):
        Image.new("RGB", (28, 28), colour).save(tmp_path / f"{colour}.png")
        rows = [json.dumps({"image": f"{colour}.png", "instruction": "what colour is it", "answer": colour})] * count
        (tmp_path / f"{colour}.jsonl").write_text("\n".join(rows) + "\n")
        sets.append({"path": str(tmp_path / f"{colour}.jsonl")})
    config = load_train_config(None, [
        "--model.stage", "stage2", "--model.blip2", str(directory), "--data.source", "instructions",
        "--data.sets", json.dumps(sets), "--data.image_root", str(tmp_path), "--data.image_size", "28",
        "--data.batch_size", "8", "--data.num_workers", "0", "--output_dir", str(tmp_path / "run")])
    job = build_job(config, Runtime(0, 1, 0, torch.device("cpu")))
    batches = data_batches(job, config, Runtime(0, 1, 0, torch.device("cpu")))
    assert batches.sampler.mixture is job.mixture and job.mixture.sizes == [2, 6]
    order = batches.sampler.epoch_order(0)
    batch = next(batches)
    assert batch["texts"] == ["red" if index < 2 else "blue" for index in order]
