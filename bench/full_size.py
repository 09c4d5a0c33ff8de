"""Full-size BLIP-2 checkpoints on random weights: load time, time to the first caption, peak
memory and the generated tokens, qformer against transformers, each side in a fresh process.

    .venv/bin/python bench/full_size.py [--models blip2-opt-2.7b blip2-flan-t5-xl] [--dtype bfloat16]
        [--device cpu|cuda] [--cache ~/.cache/qformer-bench] [--repeats 1] [--device-map auto]

The first run builds each checkpoint once into the cache folder (outside the repository): the
exact shapes of the official model in transformers' layout, bf16 safetensors shards of 2 GB,
weights normal(0, 0.02) (LayerNorm weights 1), a byte-level BPE tokenizer and BLIP-2's
preprocessor config. Then, for each model and side, a child process loads the directory with the
requested dtype and device, captions one image (greedy, 8 new tokens, no prompt) and reports the
seconds to load, the seconds from start to the first caption, its peak RSS (and peak CUDA memory
on a GPU) and the tokens. The table gives both sides and transformers / qformer ratios (> 1:
qformer takes less). ``tiny-opt`` (a small ViT, Q-Former and OPT; not an official model) is the
``load`` benchmark's quick size (bench/bench_loading.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
QFORMER = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)
LLMS = {
    "blip2-opt-2.7b": dict(model_type="opt", vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                           num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                           pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "blip2-opt-6.7b": dict(model_type="opt", vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                           num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096,
                           pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "blip2-flan-t5-xl": dict(model_type="t5", vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_layers=24,
                             num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                             decoder_start_token_id=0),
    # not an official model: OPT's vocabulary on a narrow LLM, for bench/run.py --quick
    "tiny-opt": dict(model_type="opt", vocab_size=50272, hidden_size=256, ffn_dim=1024, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=2048, word_embed_proj_dim=256,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2),
}
# the image encoder and Q-Former of a model where they are not BLIP-2's (EVA ViT-g, BERT-base)
SMALL_TOWERS = (dict(EVA_VIT_G, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
                dict(QFORMER, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                     encoder_hidden_size=256))
TOWERS = {"tiny-opt": SMALL_TOWERS}
IMAGE_TOKEN = {"opt": 50265, "t5": 32100}
NEW_TOKENS = 8


def save_tokenizer(llm: dict, directory: Path) -> None:
    """A byte-level BPE tokenizer over a few sentences with the LLM's special ids: OPT's puts
    </s> (2) in front, T5's ends on </s> (1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    opt = llm["model_type"] == "opt"
    specials = ["<s>", "<pad>", "</s>"] if opt else ["<pad>", "</s>", "<unk>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    words = "a photo of a cat dog sitting on the table with two red cups question answer what colour is it\n"
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([words] * 10, trainer)
    eos = specials.index("</s>")
    core.post_processor = processors.TemplateProcessing(single="</s> $A" if opt else "$A </s>",
                                                        special_tokens=[("</s>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                            bos_token="</s>" if opt else None).save_pretrained(directory)


def build_checkpoint(name: str, directory: Path, stored: str = "bfloat16") -> None:
    """Random weights with the official shapes, saved by transformers in shards of ``stored``
    dtype (the official files are fp32)."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    llm = dict(LLMS[name])
    vision, qformer = TOWERS.get(name, (EVA_VIT_G, QFORMER))
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=llm, num_query_tokens=32,
                         image_token_index=IMAGE_TOKEN[llm["model_type"]])
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    model = model.to(getattr(torch, stored)).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if "norm" in key and key.endswith("weight"):
                tensor.fill_(1.0)
            elif key.endswith("bias"):
                tensor.zero_()
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
        model.language_model.tie_weights()
    tmp = directory.with_name(directory.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="2GB")
    save_tokenizer(llm, tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True}))
    tmp.rename(directory)


def bench_image(path: Path) -> Path:
    """A 640x480 test picture (gradients and shapes), written once."""
    if not path.is_file():
        import numpy as np
        from PIL import Image, ImageDraw

        y, x = np.mgrid[0:480, 0:640]
        pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], axis=-1).astype("uint8")
        image = Image.fromarray(pixels)
        ImageDraw.Draw(image).ellipse((200, 120, 440, 360), fill=(200, 30, 30))
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return path


def child(side: str, directory: str, image: str, dtype: str, device: str, device_map: str | None) -> dict:
    """One side, in this (fresh) process: load, caption once, report."""
    start = time.perf_counter()
    import torch

    torch_dtype = getattr(torch, dtype)
    if side == "transformers":
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        kwargs = {"device_map": device_map} if device_map else {"device_map": device}
        model = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch_dtype, **kwargs).eval()
        processor = Blip2Processor.from_pretrained(directory)
        loaded = time.perf_counter()
        from PIL import Image

        # the queries' placeholders in front of the prompt's ids, as the official processor builds them
        text = processor.tokenizer([""], return_tensors="pt")
        placeholders = torch.full((1, model.config.num_query_tokens), model.config.image_token_index)
        inputs = {"pixel_values": processor.image_processor(Image.open(image).convert("RGB"),
                                                            return_tensors="pt")["pixel_values"],
                  "input_ids": torch.cat([placeholders, text.input_ids], 1),
                  "attention_mask": torch.cat([torch.ones_like(placeholders), text.attention_mask], 1)}
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS)
        # decoder-only: the prompt comes back in front; encoder-decoder: the decoder's start token
        new = inputs["input_ids"].shape[1] if model.config.use_decoder_only_language_model else 1
        tokens = out[0, new:].tolist()
    else:
        from qformer import Blip2

        placement = {"device_map": device_map} if device_map else {"device": device}
        model = Blip2.from_pretrained(directory, dtype=dtype, **placement)
        loaded = time.perf_counter()
        pixels = model.preprocess([image])
        text = model.tokenizer([""], return_tensors="pt").to(pixels.device)
        out = model.generate(pixels, text.input_ids, text.attention_mask, do_sample=False, num_beams=1,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        tokens = out[0].tolist()
    first = time.perf_counter()
    peak_cuda = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    return {"side": side, "load_s": loaded - start, "first_caption_s": first - start,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "peak_cuda_gib": peak_cuda, "tokens": tokens}


def warm_page_cache(directory: Path) -> None:
    """Read every file once, so that both sides start from the same warm page cache."""
    for file in directory.iterdir():
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def weight_bytes(directory: Path, dtype: str) -> int:
    """The checkpoint's parameter count times the requested dtype's size."""
    from safetensors import safe_open

    count = 0
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for s in shape:
                    n *= s
                count += n
    return count * (4 if dtype == "float32" else 2)


def checkpoint(cache: Path, name: str, stored: str = "bfloat16") -> Path:
    """The cached checkpoint directory of ``name``, built on first use."""
    directory = cache / (name if stored == "bfloat16" else f"{name}-{stored}")
    if not directory.is_dir():
        print(f"building {directory} (once) ...", flush=True)
        begin = time.perf_counter()
        cache.mkdir(parents=True, exist_ok=True)
        build_checkpoint(name, directory, stored)
        print(f"  built in {time.perf_counter() - begin:.0f} s", flush=True)
    return directory


def run_side(side: str, directory: Path, image: Path, dtype: str = "bfloat16", device: str = "cpu",
             device_map: str | None = None) -> dict:
    """One side (transformers or qformer) in a fresh child process, from a warm page cache: the
    child's report (load_s, first_caption_s, peak_rss_gib, peak_cuda_gib, tokens)."""
    warm_page_cache(directory)
    command = [sys.executable, __file__, "--child", side, str(directory), "--image", str(image),
               "--dtype", dtype, "--device", device]
    if device_map:
        command += ["--device-map", device_map]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        sys.exit(f"{side} on {directory.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["blip2-opt-2.7b", "blip2-flan-t5-xl"], choices=sorted(LLMS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--stored", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the checkpoint's own dtype (the official files are float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--device-map", default=None, help="e.g. auto: spread over every GPU there is")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/qformer-bench"))
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per side (the best is kept)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.image, args.dtype, args.device, args.device_map)))
        return

    cache = Path(args.cache)
    image = bench_image(cache / "bench.png")
    for name in args.models:
        directory = checkpoint(cache, name, args.stored)
        results = {}
        for side in ("transformers", "qformer"):
            runs = [run_side(side, directory, image, args.dtype, args.device, args.device_map)
                    for _ in range(args.repeats)]
            results[side] = min(runs, key=lambda r: r["first_caption_s"])
        ref, ours = results["transformers"], results["qformer"]
        weights = weight_bytes(directory, args.dtype) / GIB
        where = args.device_map and f"device_map={args.device_map}" or args.device
        print(f"\n{name} (stored {args.stored}), {args.dtype} on {where}, weights {weights:.2f} GiB, "
              f"{os.cpu_count()} cores, warm page cache")
        print(f"{'':<26}{'transformers':>14}{'qformer':>10}{'ratio':>8}")
        for key, label in (("load_s", "load (s)"), ("first_caption_s", "first caption (s)"),
                           ("peak_rss_gib", "peak RSS (GiB)"), ("peak_cuda_gib", "peak CUDA (GiB)")):
            if ref[key] is None:
                continue
            print(f"{label:<26}{ref[key]:>14.2f}{ours[key]:>10.2f}{ref[key] / ours[key]:>7.2f}x")
        print(f"{'peak RSS / weight bytes':<26}{ref['peak_rss_gib'] / weights:>14.2f}"
              f"{ours['peak_rss_gib'] / weights:>10.2f}")
        print(f"tokens identical: {ref['tokens'] == ours['tokens']}  transformers {ref['tokens']}  qformer "
              f"{ours['tokens']}")


if __name__ == "__main__":
    main()
