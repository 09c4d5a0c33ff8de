"""From training to use: a tiny stage 1 -> stage 2 (BLIP-2, with LoRA, InstructBLIP) ends in a
``final/`` that qformer and transformers load in one call and that generates the same tokens;
``qformer export`` writes any checkpoint the same way."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from qformer.cli import main
from qformer.data.transforms import eval_transform
from qformer.pretrained.stage2 import Blip2, InstructBlip, reserve_image_token
from stage2_helpers import IMAGE_TOKEN, call_state, tiny_blip2_config, tiny_tokenizer, with_image_tokens

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SIZE = 32  # the tiny recipe's image size (the transformers default would be 224)
VARIANTS = {"blip2": {}, "lora": {"lora_r": 2}, "instruct": {"instruct": True, "tokenizer": "minilm"}}


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage1")
    main(["train", str(TINY), "--output_dir", str(run), "--steps", "2"])
    return run


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("opt")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_blip2_config("opt").text_config).save_pretrained(directory)
    tiny_tokenizer(add_bos=True).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(VARIANTS))
def stage2_run(request, stage1_run, llm_dir, tmp_path_factory) -> tuple[str, Path]:
    run = tmp_path_factory.mktemp(request.param)
    model = {"stage": "stage2", "init_from": str(stage1_run / "final"), "language_model": str(llm_dir),
             **VARIANTS[request.param]}
    recipe = {"model": model, "data": {"image_size": SIZE, "batch_size": 2, "num_workers": 0,
                                       "scenes_per_combination": 1, "max_text_length": 12},
              "optim": {"lr": 1e-3, "warmup_steps": 1}, "steps": 2, "save_every": 2, "log_every": 1,
              "output_dir": str(run)}
    (run / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    main(["train", str(run / "recipe.yaml")])
    return request.param, run


def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


@pytest.mark.numerics
def test_final_loads_in_transformers_and_generates_the_same_tokens(stage2_run, tmp_path):
    variant, run = stage2_run
    final = run / "final"
    ours = Blip2.from_pretrained(final, dtype="float32")
    assert isinstance(ours, InstructBlip) == (variant == "instruct")
    assert ours.config.image_token_index == IMAGE_TOKEN  # the tokenizer's <image>
    assert ours.config.image.size == SIZE and ours.config.ln_vision_eps == ours.config.vision.layer_norm_eps
    assert (final / "tokenizer_config.json").is_file()
    assert json.loads((final / "preprocessor_config.json").read_text())["size"] == {"height": SIZE, "width": SIZE}
    reference_cls = InstructBlipForConditionalGeneration if variant == "instruct" else Blip2ForConditionalGeneration
    reference, info = reference_cls.from_pretrained(final, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference.eval()

    pixels = eval_transform([photo(tmp_path)] * 2, ours.config.image)
    text = ours.tokenizer(["a photo of", "a photo of"], return_tensors="pt")
    ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
    extra = ours.instruction(["a photo of"] * 2)
    generation = dict(max_new_tokens=5, num_beams=1, do_sample=False)
    expected = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **extra, **generation)
    got = ours.generate(pixels, text.input_ids, text.attention_mask, **extra, **generation)
    assert torch.equal(got, expected[:, ids.shape[1]:]), (got, expected)
    if variant == "lora":  # the adapters are merged into the LLM's weights
        assert not any("lora" in key for key in load_file(final / "model.safetensors"))


@pytest.mark.numerics
def test_export_of_the_last_checkpoint_equals_final(stage2_run, tmp_path):
    variant, run = stage2_run
    main(["export", str(run / "step_0000002"), str(tmp_path / "out")])
    written, final = (load_file(d / "model.safetensors") for d in (tmp_path / "out", run / "final"))
    assert written.keys() == final.keys()
    for key, tensor in final.items():
        assert torch.equal(written[key], tensor), key
    if variant == "instruct":
        assert (tmp_path / "out" / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    main(["export", str(run), str(tmp_path / "out"), "--overwrite"])  # a run folder: its last checkpoint
    assert not list(tmp_path.glob(".staging_*")) and not list(tmp_path.glob(".old_*"))


def test_final_and_export_tokenizers_carry_no_call_state(stage1_run, stage2_run, tmp_path):
    """Training tokenizes with truncation and padding (at 12 here): none of it is saved, so that
    transformers' processors and plain tokenizers clients read final/ and exports as we do."""
    variant, run = stage2_run
    main(["export", str(run), str(tmp_path / "out")])
    folders = [stage1_run / "final", run / "final", tmp_path / "out"]
    if variant == "instruct":
        folders += [run / "final" / "qformer_tokenizer", tmp_path / "out" / "qformer_tokenizer"]
    for folder in folders:
        assert call_state(folder) == {}, folder
    assert AutoTokenizer.from_pretrained(str(stage1_run / "final")).bos_token == "[DEC]"
    assert AutoTokenizer.from_pretrained(str(run / "final")).convert_tokens_to_ids("<image>") == IMAGE_TOKEN


@pytest.mark.parametrize("stage2_run", ["blip2"], indirect=True)
def test_cli_captions_with_the_final_model(stage2_run, tmp_path, capsys):
    _, run = stage2_run
    image = photo(tmp_path)
    capsys.readouterr()
    main(["caption", "--model", str(run / "final"), "--device", "cpu", "--json", "--max-new-tokens", "3",
          str(image)])  # returns: exit status 0
    row = json.loads(capsys.readouterr().out)
    assert row["image"].endswith("photo.png") and isinstance(row["caption"], str)


def test_export_mistakes_are_one_line(stage1_run, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "nowhere"), str(tmp_path / "a")], "not found"),
        ([str(stage1_run / "final"), str(tmp_path / "a")], "neither a run folder"),  # a model already
        ([str(stage1_run), str(stage1_run)], "not empty"),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["export", *arguments])
        assert stop.value.code == 1
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


def test_stage1_export_loads(stage1_run, tmp_path):
    from qformer.pretrained.stage1 import Blip2Stage1

    main(["export", str(stage1_run), str(tmp_path / "s1")])
    exported, final = (Blip2Stage1.from_pretrained(d) for d in (tmp_path / "s1", stage1_run / "final"))
    assert exported.config.image.size == SIZE
    for (key, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_image_token_is_reserved_where_the_vocabulary_has_room():
    """The tiny OPT tokenizer has <image> (and the LLM spare rows): nothing changes. A LLaMA-like
    tokenizer has none and the LLM no spare row: both grow by one, the same way every time."""
    tokenizer = tiny_tokenizer(add_bos=True)
    opt = AutoModelForCausalLM.from_config(tiny_blip2_config("opt").text_config)
    rows = opt.get_input_embeddings().weight.shape[0]
    assert reserve_image_token(tokenizer, opt) == IMAGE_TOKEN and opt.get_input_embeddings().weight.shape[0] == rows

    core = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "cat": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    built = []
    for _ in range(2):  # resizing changes the LLM's config: a new one each time
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=False))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>")
        index = reserve_image_token(tokenizer, model)
        assert index == 4 and model.config.vocab_size == 5 and tokenizer.convert_ids_to_tokens(index) == "<image>"
        assert tokenizer.decode([3, index], skip_special_tokens=True) == "cat"
        for table in (model.get_input_embeddings(), model.get_output_embeddings()):
            assert table.weight.shape[0] == 5
            torch.testing.assert_close(table.weight[index], table.weight[:index].mean(0))
        built.append(model.get_input_embeddings().weight.detach().clone())
    assert torch.equal(*built)


@pytest.mark.numerics
@pytest.mark.parametrize("stage2_run", ["blip2"], indirect=True)
def test_eval_of_final_equals_eval_of_the_last_checkpoint(stage2_run, tmp_path):
    _, run = stage2_run
    main(["eval", str(run / "step_0000002"), "--out", str(tmp_path / "step.json")])
    main(["eval", str(run / "final"), "--out", str(tmp_path / "final.json")])
    step, final = (json.loads((tmp_path / name).read_text()) for name in ("step.json", "final.json"))
    assert step.keys() == final.keys() and any(key.endswith("exact_match") for key in step)
    assert step == final
