"""The exported image path (issue #29): onnxruntime on the CPU against PyTorch eager, images/s at
batch 1 and 8 in one run, the outputs compared, the export's time and file sizes.

Full size is blip2-opt-2.7b's image path (EVA ViT-g, the Q-Former, the projection to OPT-2.7B's
2560) on random weights; the LLM is not in the path, so a one-layer OPT of that width stands in
for it. ``--quick`` uses the small towers of full_size.py's ``tiny-opt``. ``ours`` is onnxruntime,
``ref`` PyTorch eager; ``speedup`` > 1: onnxruntime is faster."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from full_size import EVA_VIT_G, LLMS, QFORMER, SMALL_TOWERS
from harness import Result, time_alternately
from qformer.config import Blip2Config, VisionConfig
from qformer.export.writer import export_model
from qformer.pretrained.stage2 import Blip2

VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "layer_norm_eps", "qkv_bias")
QFORMER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "cross_attention_frequency", "encoder_hidden_size")


def image_path_model(quick: bool) -> Blip2:
    """blip2-opt-2.7b's image path (quick: small towers) on random weights, normal(0, 0.02)."""
    vision, qformer = SMALL_TOWERS if quick else (EVA_VIT_G, QFORMER)
    llm = {**LLMS["blip2-opt-2.7b"], "num_hidden_layers": 1, "vocab_size": 64}  # width 2560; not in the path
    config = Blip2Config(vision=VisionConfig(**{k: vision[k] for k in VISION_KEYS}),
                         qformer=Blip2Config(text_config=llm).qformer.replace(**{k: qformer[k] for k in QFORMER_KEYS}), text_config=llm)
    torch.manual_seed(0)
    model = Blip2(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02)
    return model


def bench_onnx_image_path(quick: bool, device: str) -> Result:
    if device != "cpu":
        raise ValueError("this benchmark compares onnxruntime's CPU provider with PyTorch on the CPU")
    model = image_path_model(quick)
    size = model.config.image.size
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = export_model(model, Path(tmp) / "onnx")
        export_s = time.perf_counter() - started
        files = {f.name: f.stat().st_size for f in out.iterdir() if f.name.startswith("image_prefix")}
        session = ort.InferenceSession(str(out / "image_prefix.onnx"), providers=["CPUExecutionProvider"])
        result = Result("onnx_image_path", extra={"export_s": export_s, "file_bytes": files,
                                                  "params": sum(p.numel() for n, p in model.named_parameters()
                                                                if not n.startswith("language_model."))})
        diffs = []
        for batch in (1, 8):
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            feed = {"pixel_values": pixels.numpy()}

            def eager() -> torch.Tensor:
                with torch.no_grad():
                    return model.language_model_inputs(model.image_embeds(pixels))

            timing = time_alternately(lambda: session.run(None, feed), eager, rounds=2 if quick else 3)
            diffs.append(float(np.abs(session.run(None, feed)[0] - eager().numpy()).max()))
            result.extra[f"onnxruntime_images_per_s_b{batch}"] = batch / timing.ours_s
            result.extra[f"eager_images_per_s_b{batch}"] = batch / timing.ref_s
            if batch == 1:
                timing.into(result)
        result.max_abs_diff = max(diffs)
    return result


BENCHMARKS = {"onnx_image_path": bench_onnx_image_path}
