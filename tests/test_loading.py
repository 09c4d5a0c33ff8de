"""Loading at size: meta-device build, dtype and device, transformers' fp32 modules, device maps,
processor settings, pytorch_model.bin, on tiny random models saved by transformers."""

import json
import pickle

import pytest
import torch
from torch.testing import assert_close
from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from qformer import Blip2Stage1, QFormer
from qformer.checkpoint import load_state_dict_strict, read_weights
from qformer.convert.transformers_blip2 import TRANSFORMERS_BLIP2, blip2_config_from_transformers
from qformer.convert.transformers_instructblip import TRANSFORMERS_INSTRUCTBLIP
from qformer.devices import dtype_name, parse_device, parse_dtype
from qformer.loading import tied_parameters
from qformer.pretrained.lavis import fill_tied
from qformer.pretrained.stage2 import Blip2, InstructBlip
from qformer.pretrained.transformers import image_config_from_directory
from stage2_helpers import IMAGE, save_tiny_blip2, tiny_tokenizer
from test_instructblip import tiny_transformers_instructblip

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

LLMS = ["opt", "llama", "t5"]


@pytest.fixture(scope="module", params=LLMS)
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"blip2-{request.param}")
    save_tiny_blip2(directory, request.param)
    return request.param, directory


@pytest.fixture(scope="module", params=["t5", "llama"])
def saved_instruct(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"instructblip-{request.param}")
    tiny_transformers_instructblip(request.param).save_pretrained(directory)
    tiny_tokenizer(add_bos=request.param != "t5").save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")
    return request.param, directory


def eager_blip2(directory):
    """The loading this replaces: an fp32 model built with random weights, then every tensor copied."""
    values = json.loads((directory / "config.json").read_text())
    model = Blip2(blip2_config_from_transformers(values, image_config_from_directory(directory)))
    ours, report = TRANSFORMERS_BLIP2.to_ours(read_weights(directory))
    fill_tied(model, ours, report)
    load_state_dict_strict(model, ours)
    return model.eval()


def copy_without_weights(directory, target):
    """The directory's configs and tokenizer, for a test to write other weights beside."""
    target.mkdir()
    for file in directory.iterdir():
        if file.suffix != ".safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    return target


def every_tensor(model):
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def test_meta_build_then_load_equals_eager_build_then_load(saved):
    _, directory = saved
    lazy, eager = Blip2.from_pretrained(directory), eager_blip2(directory)
    lazy_tensors, eager_tensors = every_tensor(lazy), every_tensor(eager)
    assert lazy_tensors.keys() == eager_tensors.keys()
    for name, tensor in lazy_tensors.items():
        assert tensor.device.type == "cpu", name  # nothing left on the meta device, buffers included
        assert tensor.dtype == eager_tensors[name].dtype and torch.equal(tensor, eager_tensors[name]), name
    assert tied_parameters(lazy) == tied_parameters(eager)  # tied embeddings are one parameter again
    for names in tied_parameters(lazy):
        assert len({id(lazy.get_parameter(n)) for n in names}) == 1
    assert [n for n, p in lazy.named_parameters() if p.requires_grad] == \
        [n for n, p in eager.named_parameters() if p.requires_grad]
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    kwargs = {"labels": ids} if lazy.is_encoder_decoder else {}
    # The tensors are bit-equal (above); the logits equal to rounding: a BLAS may round by a
    # tensor's alignment in memory (MKL outside its reproducible mode), which loading may change.
    assert_close(lazy(pixels, ids, **kwargs).logits, eager(pixels, ids, **kwargs).logits)


def test_stage1_and_qformer_load_lazily_and_exactly(tmp_path):
    from conftest import tiny_config
    from qformer import Blip2Stage1Config
    from qformer.config import VisionConfig

    config = Blip2Stage1Config(vision=VisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=28, patch_size=14),
                               qformer=tiny_config(), num_query_tokens=4, embed_dim=16)
    stage1 = Blip2Stage1(config)
    stage1.save_pretrained(tmp_path / "stage1")
    stage1.qformer.save_pretrained(tmp_path / "qformer")
    for original, loaded in ((stage1, Blip2Stage1.from_pretrained(tmp_path / "stage1")),
                             (stage1.qformer, QFormer.from_pretrained(tmp_path / "qformer"))):
        for name, tensor in every_tensor(loaded).items():
            assert torch.equal(tensor, every_tensor(original)[name]), name

    half = Blip2Stage1.from_pretrained(tmp_path / "stage1", dtype="fp16")  # as LAVIS: the encoder alone in fp16
    assert {p.dtype for p in half.vision.parameters()} == {torch.float16}
    assert all(p.dtype == torch.float32 for n, p in half.named_parameters() if not n.startswith("vision."))
    assert half.config.vision_dtype == "float16"
    assert {p.dtype for p in Blip2Stage1.from_pretrained(tmp_path / "stage1", dtype="bf16").parameters()} == \
        {torch.bfloat16}
    assert {p.dtype for p in QFormer.from_pretrained(tmp_path / "qformer", dtype=torch.bfloat16).parameters()} == \
        {torch.bfloat16}
    out = half.image_features(half.query_pass(half.qformer.encoder_key_values(
        half.image_embeds(torch.randn(2, 3, 28, 28)))).last_hidden_state)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 16)


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16, "torch.float16", "half", "fp32", "auto", None])
def test_dtype_is_honoured_for_every_parameter_and_buffer(saved, dtype):
    llm, directory = saved
    model = Blip2.from_pretrained(directory, dtype=dtype, device="cpu")
    wanted = torch.float32 if parse_dtype(dtype) == "auto" else parse_dtype(dtype)  # the tiny files are fp32
    reference = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=wanted)
    theirs = {k: v.dtype for k, v in reference.state_dict().items()}
    ours_to_theirs = TRANSFORMERS_BLIP2.to_ours({k: k for k in theirs})[0]
    for name, tensor in every_tensor(model).items():
        assert tensor.device == torch.device("cpu"), name
        expected = theirs.get(ours_to_theirs.get(name, name))
        if expected is None:  # a buffer computed at build (LLaMA's rotary table): fp32 as transformers keeps it
            expected = dict(reference.named_buffers())[name].dtype
        assert tensor.dtype == expected, (name, tensor.dtype, expected)
    assert model.config.vision_dtype == model.config.llm_dtype == dtype_name(wanted)
    if wanted == torch.float16:  # transformers keeps the queries, the Q-Former (and T5's wo) in fp32
        assert model.query_tokens.dtype == torch.float32 and model.vision.patch_embedding.weight.dtype == wanted
        assert (llm == "t5") == any(p.dtype == torch.float32 for p in model.language_model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generates_what_transformers_generates(saved, dtype):
    llm, directory = saved
    ours = Blip2.from_pretrained(directory, dtype=dtype)
    ref = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)).to(dtype)
    tokenizer = tiny_tokenizer(add_bos=llm != "t5")
    tokenizer.padding_side = "right" if llm == "t5" else "left"  # as each generates (ours re-pads, theirs does not)
    prompt = tokenizer(["a photo of", "two"], return_tensors="pt", padding=True)
    ours_tokens = ours.generate(pixels, prompt.input_ids, prompt.attention_mask, max_new_tokens=4, do_sample=False,
                                num_beams=1, min_new_tokens=4)
    queries = torch.full((2, ref.config.num_query_tokens), ref.config.image_token_index)
    ids = torch.cat([queries, prompt.input_ids], 1)
    mask = torch.cat([torch.ones_like(queries), prompt.attention_mask], 1)
    ref_tokens = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=4,
                              do_sample=False, num_beams=1, min_new_tokens=4)
    ref_tokens = ref_tokens[:, 1:] if llm == "t5" else ref_tokens[:, ids.shape[1]:]
    assert torch.equal(ours_tokens, ref_tokens)


def test_fp16_keeps_what_transformers_keeps_for_instructblip(saved_instruct):
    _, directory = saved_instruct
    model = Blip2.from_pretrained(directory, dtype="float16")
    assert isinstance(model, InstructBlip)
    reference = InstructBlipForConditionalGeneration.from_pretrained(directory, dtype=torch.float16)
    theirs = {k: v.dtype for k, v in reference.state_dict().items()}
    for ours_name, their_name in TRANSFORMERS_INSTRUCTBLIP.to_ours({k: k for k in theirs})[0].items():
        assert model.state_dict()[ours_name].dtype == theirs[their_name], ours_name
    assert model.query_tokens.dtype == torch.float32 and model.qformer.layers[0].query_ffn.fc1.weight.dtype == \
        torch.float16  # InstructBLIP keeps only its queries in fp32
    text = tiny_tokenizer(add_bos=True)(["what colour is it"], return_tensors="pt")
    out = model(torch.randn(1, 3, IMAGE, IMAGE), text.input_ids, labels=text.input_ids,
                qformer_input_ids=text.input_ids)
    assert torch.isfinite(out.loss)


def test_an_explicit_device_map_gives_the_logits_of_one_device(saved):
    llm, directory = saved
    one = Blip2.from_pretrained(directory)
    if torch.cuda.device_count() >= 2:
        devices = ["cuda:0", "cuda:1"]
    else:  # one device here: the map still goes through accelerate's dispatch hooks
        devices = ["cpu", "cpu"]
    layers = {"opt": "language_model.model.decoder.layers.1", "llama": "language_model.model.layers.1",
              "t5": "language_model.decoder"}[llm]
    spread = Blip2.from_pretrained(directory, device_map={"": devices[0], layers: devices[1]})
    assert hasattr(spread.language_model, "_hf_hook")  # dispatched by accelerate
    assert spread.language_model.get_submodule(layers.removeprefix("language_model.")).parameters().__next__().device \
        == torch.device(devices[1])
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    kwargs = {"labels": ids} if one.is_encoder_decoder else {}
    expected = one(pixels, ids, **kwargs).logits
    got = spread(pixels.to(devices[0]), ids.to(devices[0]), **{k: v.to(devices[0]) for k, v in kwargs.items()}).logits
    assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    prompt = ids[:1] if not one.is_encoder_decoder else ids[:1, 1:]
    assert torch.equal(one.generate(pixels[:1], prompt, max_new_tokens=3, do_sample=False).cpu(),
                       spread.generate(pixels[:1].to(devices[0]), prompt.to(devices[0]), max_new_tokens=3,
                                       do_sample=False).cpu())


def test_device_and_device_map_errors(saved):
    _, directory = saved
    with pytest.raises(ValueError, match="not both"):
        Blip2.from_pretrained(directory, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="disk offload is not supported"):
        Blip2.from_pretrained(directory, device_map={"": "cpu", "language_model.lm_head": "disk"})
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Blip2.from_pretrained(directory, device="gpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        Blip2.from_pretrained(directory, dtype="fp8")
    auto = Blip2.from_pretrained(directory, device_map="auto")  # no GPU here: all on the CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.vision.patch_embedding.weight.device.type == expected or torch.backends.mps.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_missing_cuda_is_named():
    with pytest.raises(ValueError, match="CUDA is not available"):
        parse_device("cuda")


def test_dtype_spellings():
    for spelling in ("bfloat16", "bf16", "BF16", "torch.bfloat16", torch.bfloat16):
        assert parse_dtype(spelling) == torch.bfloat16 and dtype_name(spelling) == "bfloat16"
    for spelling in ("float16", "fp16", "half", "torch.float16"):
        assert parse_dtype(spelling) == torch.float16
    assert parse_dtype(None) == parse_dtype("auto") == "auto"
    from qformer.config import Blip2Config

    assert Blip2Config(text_config={"model_type": "opt"}, llm_dtype="bf16", vision_dtype="torch.float16").llm_dtype \
        == "bfloat16"
    with pytest.raises(ValueError, match="llm_dtype: unknown dtype 'int4'"):
        Blip2Config(text_config={"model_type": "opt"}, llm_dtype="int4")


def test_processor_config_is_read_before_preprocessor_config(saved):
    from transformers import BlipImageProcessor

    _, directory = saved
    target = directory.parent / f"{directory.name}-processor"
    target.mkdir(exist_ok=True)
    for file in directory.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    settings = {"image_processor_type": "BlipImageProcessor", "size": {"height": 56, "width": 56},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "do_resize": True,
                "do_normalize": True, "do_rescale": True, "resample": 3}
    (target / "processor_config.json").write_text(json.dumps({"image_processor": settings,
                                                              "processor_class": "Blip2Processor"}))
    transformers_reads = BlipImageProcessor.from_pretrained(target)
    image = image_config_from_directory(target)
    assert image.size == transformers_reads.size["height"] == 56
    assert list(image.mean) == list(transformers_reads.image_mean) == [0.5] * 3
    assert list(image.std) == list(transformers_reads.image_std) == [0.25] * 3
    (target / "preprocessor_config.json").unlink()
    assert image_config_from_directory(target) == image  # transformers 5 writes only processor_config.json


def test_pytorch_model_bin_loads_with_weights_only_and_refuses_code(saved, tmp_path):
    _, directory = saved
    target = copy_without_weights(directory, tmp_path / "bin")
    torch.save(read_weights(directory), target / "pytorch_model.bin")
    loaded, eager = Blip2.from_pretrained(target, dtype="bf16"), eager_blip2(directory)
    for name, tensor in every_tensor(loaded).items():
        assert torch.equal(tensor, every_tensor(eager)[name].to(tensor.dtype)), name

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(target / "pytorch_model.bin", "wb") as f:  # a bare pickle: not even torch's format
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        Blip2.from_pretrained(target)
    torch.save({"x": Payload()}, target / "pytorch_model.bin")  # torch's format, asking for open()
    with pytest.raises(ValueError, match="refused to unpickle it.*asks for io.open, which could run code"):
        Blip2.from_pretrained(target)
    assert not marker.exists()


def test_a_checkpoint_that_does_not_fit_names_every_key_before_reading(saved, tmp_path):
    from safetensors.torch import save_file

    _, directory = saved
    target = copy_without_weights(directory, tmp_path / "broken")
    weights = read_weights(directory)
    del weights["query_tokens"]
    weights["language_projection.weight"] = weights["language_projection.weight"][:, :3].contiguous()
    save_file(weights, target / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)1 missing:.*query_tokens.*mis-shaped:.*language_projection.weight"):
        Blip2.from_pretrained(target)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_llm_equals_transformers_quantized(saved, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    llm, directory = saved
    if llm == "t5" and bits == 4:
        pytest.skip("bitsandbytes' 4-bit CPU kernel needs wider layers than the tiny T5's")
    quantization = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    ours = Blip2.from_pretrained(directory, dtype="float32", quantization_config=quantization)
    # transformers quantises every Linear of BLIP-2 (the image encoder's too); ours the LLM's alone
    only_llm = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4, llm_int8_skip_modules=[
        "vision_model", "qformer", "language_projection", "lm_head"])
    ref = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                        quantization_config=only_llm, device_map="cpu").eval()
    quantized = [type(m).__name__ for m in ours.language_model.modules() if "bit" in type(m).__name__]
    assert quantized and quantized == [type(m).__name__ for m in ref.language_model.modules()
                                       if "bit" in type(m).__name__]
    assert torch.equal(ours.query_tokens, ref.query_tokens)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    queries = torch.full((2, ref.config.num_query_tokens), ref.config.image_token_index)
    if llm == "t5":
        ours_logits = ours(pixels, ids, labels=ids).logits
        ref_logits = ref(pixel_values=pixels, input_ids=torch.cat([queries, ids], 1), labels=ids).logits
    else:
        ours_logits = ours(pixels, ids).logits
        ref_logits = ref(pixel_values=pixels, input_ids=torch.cat([queries, ids], 1)).logits[:, queries.shape[1]:]
    assert_close(ours_logits, ref_logits, rtol=1e-4, atol=1e-4)
