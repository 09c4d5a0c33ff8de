"""Stage 2 against transformers' Blip2ForConditionalGeneration on tiny OPT and T5 models."""


import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from transformers import Blip2ForConditionalGeneration

from qformer.data.text import decoder_only_batch, encoder_decoder_batch, prefix_lm_split
from qformer.pretrained.stage2 import Blip2
from stage2_helpers import IMAGE, QUERIES, save_tiny_blip2, tiny_tokenizer, with_image_tokens

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

PROMPTS = ["a photo of", "what colour is the ball", "two"]


@pytest.fixture(scope="module", params=["opt", "llama", "t5"])
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = save_tiny_blip2(directory, request.param)
    return request.param, directory, ref, Blip2.from_pretrained(directory)


def pixels(batch=3, seed=0):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def test_loads_everything(saved):
    llm, directory, ref, ours = saved
    assert ours.config.num_query_tokens == QUERIES and ours.config.image.size == IMAGE
    assert ours.is_encoder_decoder == (llm == "t5")
    assert ours.config.text_suffix == ("\n" if llm == "opt" else "")
    assert ours.tokenizer is not None
    assert not any(p.requires_grad for p in ours.language_model.parameters())
    assert not any(p.requires_grad for p in ours.vision.parameters())


def test_logits_match(saved):
    llm, _, ref, ours = saved
    tokenizer = ours.tokenizer
    text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
    images = pixels()
    if llm != "t5":
        expected = ref(pixel_values=images, input_ids=ids, attention_mask=mask).logits[:, QUERIES:]
        got = ours(images, text.input_ids, text.attention_mask).logits
        keep = text.attention_mask.bool()
        assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)
    else:
        labels = tokenizer(["red ball", "blue", "two cats on a mat"], padding=True, return_tensors="pt").input_ids
        expected = ref(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(images, text.input_ids, text.attention_mask, labels=labels)
        assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
        assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3),
                                    dict(max_new_tokens=6, num_beams=3, num_return_sequences=2),
                                    dict(max_new_tokens=6, do_sample=True, num_return_sequences=2)])
def test_generated_tokens_match(saved, kwargs):
    llm, _, ref, ours = saved
    tokenizer = ours.tokenizer
    for prompt in PROMPTS:  # one prompt at a time: transformers' own batching pads its way
        text = tokenizer([prompt] * 2, return_tensors="pt")
        ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
        torch.manual_seed(0)
        expected = ref.generate(pixel_values=pixels(2), input_ids=ids, attention_mask=mask, **kwargs)
        expected = expected[:, ids.shape[1]:] if llm != "t5" else expected[:, 1:]
        torch.manual_seed(0)
        got = ours.generate(pixels(2), text.input_ids, text.attention_mask, **kwargs)
        assert torch.equal(got, expected), (prompt, got, expected)


def test_beams_of_an_image_share_one_prefill(saved):
    """A decoder-only LLM sees the prompt but its last position once per image (B rows), then
    the last position once per beam (B x n rows, the prefix cached)."""
    llm, _, _, ours = saved
    if llm == "t5":
        pytest.skip("an encoder-decoder LLM's encoder already runs once per input")
    text = ours.tokenizer(["a photo of"] * 2, return_tensors="pt")
    calls = []
    hook = ours.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])
                                                  if kwargs.get("inputs_embeds") is not None else None),
        with_kwargs=True)
    try:
        ours.generate(pixels(2), text.input_ids, text.attention_mask, max_new_tokens=3, num_beams=3)
    finally:
        hook.remove()
    length = QUERIES + text.input_ids.shape[1]
    assert calls[:2] == [(2, length - 1), (2 * 3, 1)], calls


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_by_one_with_mixed_prompts(saved, num_beams):
    _, _, _, ours = saved
    tokenizer = ours.tokenizer
    images = pixels()
    kwargs = dict(max_new_tokens=5, num_beams=num_beams, pad_token_id=0)
    for side in ("right", "left"):
        tokenizer.padding_side = side
        text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        batched = ours.generate(images, text.input_ids, text.attention_mask, **kwargs)
        for row, prompt in enumerate(PROMPTS):
            alone = ours.generate(images[row : row + 1], tokenizer([prompt], return_tensors="pt").input_ids, **kwargs)
            assert torch.equal(batched[row, : alone.shape[1]], alone[0]), (side, prompt)
    tokenizer.padding_side = "right"


def test_round_trip_through_transformers(saved, tmp_path):
    llm, _, ref, ours = saved
    ours.save_pretrained(tmp_path)
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    original = ref.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    text = ours.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
    labels = text.input_ids if llm == "t5" else None
    theirs = reloaded(pixel_values=pixels(), input_ids=ids, attention_mask=mask, labels=labels).logits
    mine = ours(pixels(), text.input_ids, text.attention_mask, labels=labels).logits
    if llm != "t5":
        theirs = theirs[:, QUERIES:]
    assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    again = Blip2.from_pretrained(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_image_placeholders_are_refused(saved):
    _, _, _, ours = saved
    text = ours.tokenizer(["a photo of"], return_tensors="pt")
    ids, mask = with_image_tokens(text.input_ids, text.attention_mask)
    with pytest.raises(ValueError, match="4 image placeholder tokens"):
        ours.generate(pixels(1), ids, mask)


def test_caption_and_answer_on_images(saved, tmp_path):
    _, _, _, ours = saved
    paths = []
    for i, colour in enumerate(["red", "blue"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    captions = ours.caption(paths, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    answers = ours.answer(paths, ["what colour is it", "is it red"], max_new_tokens=3)
    assert len(answers) == 2
    with pytest.raises(ValueError, match="cannot read image"):
        ours.caption([tmp_path / "missing.png"])


# ---------------------------------------------------------------- training inputs


def test_decoder_only_labels_mask_prompt_and_padding():
    tokenizer = tiny_tokenizer(add_bos=True)
    batch = decoder_only_batch(tokenizer, ["a photo of", "question : what colour is it answer :"], ["a cat", "red"])
    # row 0: </s> a photo of | a cat \n ; row 1: </s> question : ... answer : | red \n
    assert batch.input_ids[0, :7].tolist() == tokenizer("a photo of").input_ids + tokenizer(
        "a cat\n", add_special_tokens=False).input_ids
    assert batch.labels[0].tolist()[:4] == [-100] * 4  # bos + prompt
    assert batch.labels[0].tolist()[4:7] == tokenizer("a cat\n", add_special_tokens=False).input_ids
    assert (batch.labels[0, 7:] == -100).all() and (batch.attention_mask[0, 7:] == 0).all()
    assert batch.labels[1, -2:].tolist() == tokenizer("red\n", add_special_tokens=False).input_ids
    assert (batch.labels[1, :-2] == -100).all()


def test_decoder_only_loss_is_on_targets_only(saved):
    llm, _, _, ours = saved
    if llm == "t5":
        pytest.skip("decoder-only")
    batch = decoder_only_batch(ours.tokenizer, ["a photo of", "two"], ["a red ball", "cats"])
    out = ours(pixels(2), batch.input_ids, batch.attention_mask, labels=batch.labels)
    logp = out.logits[:, :-1].float().log_softmax(-1)
    target = batch.labels[:, 1:]
    keep = target != -100
    expected = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_inputs_and_prefix_lm():
    import random

    tokenizer = tiny_tokenizer(add_bos=False)
    batch = encoder_decoder_batch(tokenizer, ["what colour is it", "two"], ["red", "two cats on a mat"])
    assert batch.labels[0].tolist() == tokenizer("red").input_ids + [-100] * 4
    rng = random.Random(0)
    for _ in range(20):
        prefix, target = prefix_lm_split("two cats on a red mat", rng)
        assert target and f"{prefix} {target}".strip() == "two cats on a red mat"
    assert prefix_lm_split("cat", rng) == ("", "cat")


# ---------------------------------------------------------------- frozen LLM, LoRA, dtypes, stage 1


def test_frozen_llm_gets_no_gradient_and_qformer_does(saved):
    llm, directory, _, _ = saved
    model = Blip2.from_pretrained(directory).train()
    assert not model.language_model.training and not model.vision.training
    text = model.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = text.input_ids.masked_fill(text.attention_mask == 0, -100)
    model(pixels(), text.input_ids, text.attention_mask, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), trainable
    assert {n.split(".")[0] for n in trainable} == {"ln_vision", "query_tokens", "qformer", "language_projection"}


def test_lora_trains_only_adapters_in_the_llm(saved):
    llm, directory, _, _ = saved
    model = Blip2.from_pretrained(directory)
    model.add_lora(r=2, alpha=4, target_modules=["q", "v"] if llm == "t5" else ["q_proj", "v_proj"])
    lora = {n: p for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    # 2 layers x (q, v) x (A: r x 16 + B: out x r); T5's decoder adds cross-attention; LLaMA's
    # v_proj is 8 wide (one key/value head of 8)
    if llm == "llama":
        expected = 2 * ((2 * 16 + 16 * 2) + (2 * 16 + 8 * 2))
    else:
        expected = (2 * 2 if llm == "opt" else 2 * 2 + 2 * 2 * 2) * (2 * 16 + 16 * 2)
    assert sum(p.numel() for p in lora.values()) == expected
    model.train()
    text = model.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    model(pixels(), text.input_ids, text.attention_mask, labels=text.input_ids).loss.backward()
    assert all(p.grad is not None for p in lora.values())


def test_half_precision_llm_keeps_qformer_fp32(saved):
    from qformer.models.blip2 import Blip2Stage2Model

    _, _, _, ours = saved
    model = Blip2Stage2Model(ours.config.replace(llm_dtype="bfloat16"))
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.qformer.layers[0].self_attn.query.weight.dtype == torch.float32
    text = ours.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    out = model(pixels(), text.input_ids, text.attention_mask, labels=text.input_ids)
    assert out.language_model_inputs.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    if model.is_encoder_decoder:
        with pytest.raises(ValueError, match="needs labels or decoder_input_ids"):
            model(pixels(), text.input_ids, text.attention_mask)


def test_stage2_from_stage1_drops_the_text_path():
    from stage1_helpers import tiny_stage1
    from stage2_helpers import tiny_transformers_blip2

    stage1 = tiny_stage1()
    llm = tiny_transformers_blip2("opt").language_model
    model = Blip2.from_stage1(stage1, llm, tokenizer=tiny_tokenizer(add_bos=True))
    assert model.qformer.embeddings.word is None and model.qformer.lm_head is None
    assert model.qformer.layers[0].text_ffn is None
    assert torch.equal(model.query_tokens, stage1.query_tokens)
    assert torch.equal(model.qformer.layers[1].query_ffn.fc1.weight, stage1.qformer.layers[1].query_ffn.fc1.weight)
    assert model.vision is stage1.vision


def test_frozen_head_reads_the_last_position_without_copying_its_weight(saved):
    """transformers slices the prefill's last position (hidden[:, -1:]); with a weight that needs
    no gradient, torch's matmul would copy the (V, D) head weight for every row (a bmm)."""
    _, _, _, ours = saved
    head = ours.language_model.get_output_embeddings()
    assert not head.weight.requires_grad
    hidden = torch.randn(3, 5, head.weight.shape[1])[:, -1:]  # (3, 1, D), strides of (3, 5, D)
    with torch.profiler.profile() as profile:
        logits = head(hidden)
    ops = {event.key for event in profile.key_averages()}
    assert "aten::bmm" not in ops and "aten::mm" in ops, ops
    expected = hidden.reshape(3, -1) @ head.weight.T + (0 if head.bias is None else head.bias)
    assert_close(logits, expected[:, None], rtol=1e-5, atol=1e-5)


def test_a_resized_image_encoder_saves_and_loads_at_its_size(saved, tmp_path):
    """As the 364-px fine-tuning recipes do: the encoder resized, then the transformers layout
    written and read back at that size (config and preprocessing)."""
    llm, directory, _, _ = saved
    model = Blip2.from_pretrained(directory)
    size = 2 * model.config.vision.image_size
    model.resize_image_encoder(size)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    text = model.tokenizer(["a photo of", "two"], padding=True, return_tensors="pt")
    labels = text.input_ids if llm == "t5" else None
    logits = model(images, text.input_ids, text.attention_mask, labels=labels).logits
    model.save_pretrained(tmp_path)
    reloaded = Blip2.from_pretrained(tmp_path)
    assert reloaded.config.vision.image_size == size and reloaded.config.image.size == size
    assert_close(reloaded(images, text.input_ids, text.attention_mask, labels=labels).logits, logits)
    assert Blip2ForConditionalGeneration.from_pretrained(tmp_path).config.vision_config.image_size == size
