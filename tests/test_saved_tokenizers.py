"""Every tokenizer qformer saves is written without a past call's state (issue #24): no truncation
or padding in tokenizer.json, no call arguments such as max_length in tokenizer_config.json, so
that plain ``tokenizers`` clients and transformers' processors read it as we do; what the
tokenizer is (sides, special and added tokens) is kept, and the caller's tokenizer is left as
it was."""

import copy
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Blip2Processor, PreTrainedTokenizerBase

from qformer import Blip2Stage1, load_tokenizer
from qformer.pretrained.conversion import convert
from qformer.data.text import encoder_decoder_batch
from qformer.pretrained.stage2 import Blip2, InstructBlip
from qformer.tokenizer import save_tokenizer
from stage1_helpers import IMAGE, usable_stage1
from stage2_helpers import WORDS, call_state, tiny_tokenizer
from test_instructblip import tiny_transformers_instructblip

TEXTS = ["a red square on grass", "two cats on a pink blanket", "green"]
# Calls a reader may make: none of them may depend on what the saving side last did.
CALLS = ({}, {"truncation": True, "max_length": 7}, {"padding": True},
         {"padding": "max_length", "truncation": True, "max_length": 20}, {"padding": True, "truncation": True,
                                                                            "max_length": 5, "padding_side": "left"})


def images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (60 * i, 200, 30)) for i in range(count)]


def assert_saved_without_call_state(directory: Path, original: PreTrainedTokenizerBase, long_text: str) -> None:
    """The tokenizer in ``directory`` carries no call state and tokenizes exactly as ``original``."""
    assert call_state(directory) == {}
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    assert reloaded.special_tokens_map == original.special_tokens_map
    assert reloaded.get_added_vocab() == original.get_added_vocab()
    for name in ("model_max_length", "padding_side", "truncation_side"):
        assert getattr(reloaded, name) == getattr(original, name), name
    for text in (long_text, [long_text, *TEXTS]):
        for call in CALLS:
            assert reloaded(text, **call).input_ids == original(text, **call).input_ids, call
    plain = Tokenizer.from_file(str(directory / "tokenizer.json"))  # a client without transformers
    assert plain.encode(long_text).ids == original(long_text).input_ids  # whole, not cut at a past max_length
    assert [e.ids for e in plain.encode_batch(TEXTS)] == original(TEXTS).input_ids  # unpadded


def call_state_of(tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The in-memory state saving must leave alone."""
    backend = tokenizer.backend_tokenizer
    return backend.truncation, backend.padding, copy.deepcopy(tokenizer.init_kwargs)


def test_stage1_saved_after_a_call_and_converted_for_transformers(minilm_path, tmp_path):
    model = usable_stage1(load_tokenizer(minilm_path))
    model.itm_scores(images(3), TEXTS)  # tokenizes: truncation at 32, padding to the longest
    before = call_state_of(model.tokenizer)
    assert before[0] is not None  # the state this test is about
    model.save_pretrained(tmp_path / "stage1")
    assert call_state_of(model.tokenizer) == before  # the caller's tokenizer is not changed
    long_text = " ".join(["word"] * 600)  # past BERT's 512 and the 128 of the tokenizer.json it came from
    assert_saved_without_call_state(tmp_path / "stage1", model.tokenizer, long_text)

    loaded = Blip2Stage1.from_pretrained(tmp_path / "stage1")
    assert loaded.tokenizer.bos_token == "[DEC]"
    convert(tmp_path / "stage1", tmp_path / "hf", to="transformers")  # qformer convert --to transformers
    assert_saved_without_call_state(tmp_path / "hf", model.tokenizer, long_text)

    processor = Blip2Processor.from_pretrained(tmp_path / "hf")  # raised TypeError: max_length - None
    inputs = processor(images=images(3), text=TEXTS, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, IMAGE, IMAGE)
    assert inputs["input_ids"].tolist() == model.tokenizer(TEXTS, padding=True).input_ids


def test_blip2_saved_after_a_call(blip2_dir, tmp_path):
    model = Blip2.from_pretrained(blip2_dir)
    encoder_decoder_batch(model.tokenizer, ["a photo of"], ["two cats"], max_length=12)  # a training batch's call
    before = call_state_of(model.tokenizer)
    model.save_pretrained(tmp_path / "copy")
    assert call_state_of(model.tokenizer) == before
    assert_saved_without_call_state(tmp_path / "copy", model.tokenizer, " ".join(WORDS * 4))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "copy")).convert_tokens_to_ids("\n") == 3  # added token


def test_instructblip_saved_after_a_call_keeps_both_tokenizers_clean(tmp_path):
    directory = tmp_path / "instructblip"
    tiny_transformers_instructblip("llama").save_pretrained(directory)
    tiny_tokenizer(add_bos=True).save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")
    model = Blip2.from_pretrained(directory)
    assert isinstance(model, InstructBlip)
    model.instruction(["what colour is it"])  # the Q-Former's: truncation at 256 from the left, padding
    model.tokenizer(["a photo of", "two"], padding=True, truncation=True, max_length=3, return_tensors="pt")
    model.save_pretrained(tmp_path / "copy")
    long_text = " ".join(WORDS * 12)  # past qformer_max_length
    assert_saved_without_call_state(tmp_path / "copy", model.tokenizer, long_text)
    assert_saved_without_call_state(tmp_path / "copy" / "qformer_tokenizer", model.qformer_tokenizer, long_text)
    again = Blip2.from_pretrained(tmp_path / "copy")
    assert again.qformer_tokenizer.truncation_side == "left"
    assert torch.equal(again.instruction([long_text])["qformer_input_ids"],
                       model.instruction([long_text])["qformer_input_ids"])


def test_save_tokenizer_drops_what_transformers_save_pretrained_keeps(tmp_path):
    """Why save_tokenizer copies and cleans: transformers writes the last call into the files."""
    tokenizer = tiny_tokenizer(add_bos=True)
    tokenizer(["a photo of", "two"], padding="max_length", truncation=True, max_length=3)
    tokenizer.save_pretrained(tmp_path / "theirs")
    assert {"tokenizer.json truncation", "tokenizer.json padding"} <= call_state(tmp_path / "theirs").keys()
    before = call_state_of(tokenizer)
    save_tokenizer(tokenizer, tmp_path / "ours")
    assert call_state_of(tokenizer) == before
    assert_saved_without_call_state(tmp_path / "ours", tokenizer, " ".join(WORDS * 4))
