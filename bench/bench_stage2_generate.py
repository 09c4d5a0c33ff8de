"""``generate``: stage-2 captions (beam search) of our ``Blip2`` against transformers'
``Blip2ForConditionalGeneration.generate``, the same random weights (transformers' model saved,
then loaded by our converter), the same pixels, no prompt (both start from the LLM's bos).

Full size: BLIP-2's Q-Former (768 hidden, 12 layers, 32 queries), a small ViT (224 px, patch 14,
257 tokens, 2 layers of width 384) and a small OPT (6 layers of width 768, OPT's 50272-token
vocabulary); 5 beams, exactly 30 new tokens, batch 8. Both sides run the image encoder, the
Q-Former and the LLM's beam search; the tokens must be identical.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import Result, max_abs_diff, time_alternately
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

from qformer.pretrained.stage2 import Blip2

TARGET = "identical tokens; speedup >= 1.0"


@dataclass(frozen=True)
class Sizes:
    batch: int
    beams: int
    new_tokens: int
    vision: dict
    qformer: dict
    llm: dict
    rounds: int


FULL = Sizes(
    batch=8, beams=5, new_tokens=30, rounds=3,
    vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                image_size=224, patch_size=14),
    qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    llm=dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=6, num_attention_heads=12),
)
QUICK = Sizes(
    batch=2, beams=5, new_tokens=10, rounds=3,
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                image_size=112, patch_size=14),
    qformer=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256),
    llm=dict(vocab_size=8192, hidden_size=256, ffn_dim=1024, num_hidden_layers=2, num_attention_heads=4),
)
IMAGE_TOKEN = 3  # OPT's <unk>: the queries' placeholder id in transformers' prompt


def transformers_model(sizes: Sizes) -> Blip2ForConditionalGeneration:
    """Random weights: normal(0, 0.02) as the official init, the LLM's at 0.1 so that its
    next-token distributions are peaked (no near-ties for fp32 rounding to flip); LayerNorms 1."""
    llm = OPTConfig(**sizes.llm, max_position_embeddings=128, word_embed_proj_dim=sizes.llm["hidden_size"],
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    config = Blip2Config(
        vision_config=sizes.vision,
        qformer_config=dict(sizes.qformer, vocab_size=30522, encoder_hidden_size=sizes.vision["hidden_size"]),
        text_config=llm.to_dict(), num_query_tokens=32, image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.1 if name.startswith("language_model") else 0.02)
    return model


def reference_language_inputs(ref: Blip2ForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' projected query outputs (B, Q, H): what it puts in place of the placeholders."""
    return ref.get_image_features(pixels).pooler_output


def bench_generate(quick: bool, device: str) -> Result:
    sizes = QUICK if quick else FULL
    ref = transformers_model(sizes).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = Blip2.from_pretrained(Path(tmp), device=device)
    image = sizes.vision["image_size"]
    pixels = torch.randn(sizes.batch, 3, image, image, generator=torch.Generator().manual_seed(1)).to(device)
    kwargs = dict(num_beams=sizes.beams, max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens,
                  do_sample=False)
    prompt = 32 + 1  # transformers returns its placeholders and bos in front of the new tokens

    with torch.no_grad():
        diff = max_abs_diff(ours.language_model_inputs(ours.image_embeds(pixels)),
                            reference_language_inputs(ref, pixels))
        got = ours.generate(pixels, **kwargs)
        expected = ref.generate(pixel_values=pixels, **kwargs)[:, prompt:]
    assert got.shape == (sizes.batch, sizes.new_tokens), got.shape
    assert torch.equal(got, expected), (got, expected)

    def run_ours() -> None:
        with torch.no_grad():
            ours.generate(pixels, **kwargs)

    def run_ref() -> None:
        with torch.no_grad():
            ref.generate(pixel_values=pixels, **kwargs)

    result = Result("generate", max_abs_diff=diff, extra={
        "target": TARGET, "tokens_identical": True, "batch": sizes.batch, "beams": sizes.beams,
        "new_tokens": sizes.new_tokens, "rounds": sizes.rounds,
        "llm": "OPT " + ", ".join(f"{k}={v}" for k, v in sizes.llm.items()),
        "qformer": ", ".join(f"{k}={v}" for k, v in sizes.qformer.items()) + ", 32 queries",
        "vision": ", ".join(f"{k}={v}" for k, v in sizes.vision.items()),
        "max_abs_diff_of": "the LLM's input queries (B, 32, H)",
    })
    return time_alternately(run_ours, run_ref, sizes.rounds, device).into(result)


BENCHMARKS = {"generate": bench_generate}
