"""InstructBLIP against transformers' InstructBlipForConditionalGeneration on tiny LLaMA and T5."""

import json

import pytest
import torch
from stage2_helpers import IMAGE, IMAGE_TOKEN, QUERIES, tiny_blip2_config, tiny_tokenizer, with_image_tokens
from torch.testing import assert_close
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from qformer.convert.transformers_instructblip import (
    instructblip_config_from_transformers,
    instructblip_config_to_transformers,
)
from qformer.models.instructblip import InstructBlipStage2Model
from qformer.pretrained.transformers import load_transformers_instructblip, save_transformers_instructblip

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

PROMPTS = ["what colour is the ball", "two", "question : is it a photo of a cat on the mat answer :"]
TARGETS = ["red ball", "blue", "two cats on a mat"]


def tiny_instructblip_config(llm: str) -> InstructBlipConfig:
    """stage2_helpers' tiny BLIP-2 sizes; the Q-Former (vocabulary 50) reads the instruction."""
    blip2 = tiny_blip2_config(llm)
    drop = ("model_type", "use_qformer_text_input")
    vision, qformer = ({k: v for k, v in sub.to_dict().items() if k not in drop}
                       for sub in (blip2.vision_config, blip2.qformer_config))
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=blip2.text_config.to_dict(),
                              num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)


def tiny_transformers_instructblip(llm: str, seed: int = 0) -> InstructBlipForConditionalGeneration:
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(tiny_instructblip_config(llm)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name.lower():
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.5 if "language_model" in name else 0.3)
    return model


@pytest.fixture(scope="module", params=["llama", "t5"])
def saved(request, tmp_path_factory):
    """(llm, transformers model, ours loaded from its save, LLM tokenizer, Q-Former tokenizer)."""
    llm = request.param
    directory = tmp_path_factory.mktemp(f"instructblip-{llm}")
    ref = tiny_transformers_instructblip(llm)
    ref.save_pretrained(directory)
    ours, report = load_transformers_instructblip(directory)
    assert not report.unmatched
    qformer_tokenizer = tiny_tokenizer(add_bos=False)  # word ids < 50: fits the Q-Former's vocabulary
    qformer_tokenizer.truncation_side = "left"  # InstructBLIP keeps the end of a long instruction
    return llm, ref, ours.eval(), tiny_tokenizer(add_bos=llm != "t5"), qformer_tokenizer


def pixels(batch=3, seed=0):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def instruction(qformer_tokenizer, prompts):
    text = qformer_tokenizer(prompts, padding=True, return_tensors="pt")
    return dict(qformer_input_ids=text.input_ids, qformer_attention_mask=text.attention_mask)


def test_config_keeps_the_qformer_text_path(saved):
    llm, ref, ours, _, _ = saved
    assert ours.config.qformer.use_text_input and ours.qformer.embeddings.word is not None
    assert ours.qformer.lm_head is None and ours.config.text_suffix == ""
    assert ours.is_encoder_decoder == (llm == "t5")
    written = json.loads(json.dumps(instructblip_config_to_transformers(ours.config)))  # as config.json holds it
    again = instructblip_config_from_transformers(written, ours.config.image)
    assert again.replace(text_config=ours.config.text_config) == ours.config
    # transformers' save_pretrained writes the LLM config's non-defaults only; ours writes all of it
    assert all(again.text_config[k] == v for k, v in ours.config.text_config.items())
    with pytest.raises(ValueError, match="not an InstructBLIP config"):
        instructblip_config_from_transformers({**ref.config.to_dict(), "model_type": "blip-2"})
    with pytest.raises(ValueError, match="use_text_input"):
        InstructBlipStage2Model(ours.config.replace(qformer=ours.config.qformer.replace(use_text_input=False)))


def test_logits_and_loss_match(saved):
    llm, ref, ours, tokenizer, qformer_tokenizer = saved
    text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
    qformer = instruction(qformer_tokenizer, PROMPTS)
    assert (qformer["qformer_attention_mask"] == 0).any()  # mixed lengths: padding in the Q-Former's input
    if llm == "t5":
        labels = tokenizer(TARGETS, padding=True, return_tensors="pt").input_ids
        ref_labels = labels
    else:
        labels = text.input_ids.masked_fill(text.attention_mask == 0, -100)
        ref_labels = torch.cat([torch.full((3, QUERIES), -100), labels], dim=1)
    expected = ref(pixel_values=pixels(), input_ids=ids, attention_mask=mask, labels=ref_labels, **qformer)
    got = ours(pixels(), text.input_ids, text.attention_mask, labels=labels, **qformer)
    if llm == "t5":
        assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    else:
        keep = text.attention_mask.bool()
        assert_close(got.logits[keep], expected.logits[:, QUERIES:][keep], rtol=1e-4, atol=1e-4)
    assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-4)


def test_instruction_changes_the_queries(saved):
    llm, _, ours, tokenizer, qformer_tokenizer = saved
    text = tokenizer(PROMPTS[:1] * 2, return_tensors="pt")
    labels = tokenizer(TARGETS[:1] * 2, return_tensors="pt").input_ids if llm == "t5" else None
    instructions = instruction(qformer_tokenizer, ["what colour is the ball", "is it a photo of the sky"])
    out = ours(pixels(1).expand(2, -1, -1, -1), text.input_ids, text.attention_mask, labels=labels, **instructions)
    assert (out.language_model_inputs[0] - out.language_model_inputs[1]).abs().max() > 1e-2
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-2
    alone = ours(pixels(1).expand(2, -1, -1, -1), text.input_ids, text.attention_mask, labels=labels)
    assert (alone.language_model_inputs - out.language_model_inputs).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)])
def test_generated_tokens_match(saved, kwargs):
    llm, ref, ours, tokenizer, qformer_tokenizer = saved
    for prompt in PROMPTS:  # one prompt at a time: transformers' own batching pads its way
        text = tokenizer([prompt] * 2, return_tensors="pt")
        qformer = instruction(qformer_tokenizer, [prompt] * 2)
        ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
        expected = ref.generate(pixel_values=pixels(2), input_ids=ids, attention_mask=mask, **qformer, **kwargs)
        expected = expected[:, ids.shape[1]:] if llm != "t5" else expected[:, 1:]
        got = ours.generate(pixels(2), text.input_ids, text.attention_mask, **qformer, **kwargs)
        assert torch.equal(got, expected), (prompt, got, expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_instructions_batched_equal_one_by_one(saved, num_beams):
    llm, _, ours, tokenizer, qformer_tokenizer = saved
    if llm == "t5":
        pytest.skip("decoder-only")
    images = pixels()
    kwargs = dict(max_new_tokens=5, num_beams=num_beams, pad_token_id=0)
    alone = [
        ours.generate(images[row : row + 1], tokenizer([prompt], return_tensors="pt").input_ids,
                      **instruction(qformer_tokenizer, [prompt]), **kwargs)[0]
        for row, prompt in enumerate(PROMPTS)
    ]
    for side in ("right", "left"):
        tokenizer.padding_side = qformer_tokenizer.padding_side = side
        text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        batched = ours.generate(images, text.input_ids, text.attention_mask,
                                **instruction(qformer_tokenizer, PROMPTS), **kwargs)
        for row, expected in enumerate(alone):
            assert torch.equal(batched[row, : expected.shape[0]], expected), (side, PROMPTS[row])
    tokenizer.padding_side = qformer_tokenizer.padding_side = "right"


def test_round_trip_through_transformers(saved, tmp_path):
    llm, ref, ours, tokenizer, qformer_tokenizer = saved
    save_transformers_instructblip(ours, ours.config, tmp_path)
    reloaded = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    original = ref.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    again, _ = load_transformers_instructblip(tmp_path)
    mine = ours.state_dict()
    assert sorted(again.state_dict()) == sorted(mine)
    for key, value in again.state_dict().items():
        assert torch.equal(value, mine[key]), key


def test_wrong_instruction_batch_is_refused(saved):
    _, _, ours, tokenizer, qformer_tokenizer = saved
    text = tokenizer(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="pixel_values 1, input_ids 1, qformer_input_ids 2"):
        ours.generate(pixels(1), text.input_ids, **instruction(qformer_tokenizer, PROMPTS[:2]), max_new_tokens=2)


def test_the_instruction_path_trains(saved):
    llm, _, ours, tokenizer, qformer_tokenizer = saved
    text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = tokenizer(TARGETS, padding=True, return_tensors="pt").input_ids if llm == "t5" else text.input_ids
    qformer = instruction(qformer_tokenizer, PROMPTS)
    ours(pixels(), text.input_ids, text.attention_mask, labels=labels, **qformer).loss.backward()
    try:
        assert ours.qformer.embeddings.word.weight.grad.abs().sum() > 0
        assert ours.qformer.layers[0].text_ffn.fc1.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in ours.language_model.parameters())
    finally:
        ours.zero_grad(set_to_none=True)
