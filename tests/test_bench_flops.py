"""The benchmarks' FLOP formulas (bench/bench_retrieval_and_captions.py) against
``torch.utils.flop_counter`` on a small Q-Former with the benchmarks' token counts."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_retrieval_and_captions as bench  # noqa: E402

from qformer.config import Blip2Stage1Config, QFormerConfig  # noqa: E402
from qformer.generate import DecodingOptions  # noqa: E402
from qformer.pretrained.stage1 import Blip2Stage1  # noqa: E402
from qformer.retrieval import caption_images, retrieval_scores  # noqa: E402

# SDPA's CPU kernel has no formula in flop_counter: count it as its GPU kernels are counted
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}


def counted(fn) -> int:
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    qformer = QFormerConfig(hidden_size=64, num_attention_heads=2, intermediate_size=96, num_hidden_layers=3)
    return Blip2Stage1(Blip2Stage1Config(vision=None, qformer=qformer, embed_dim=16)).eval().requires_grad_(False)


def test_retrieval_flops(model):
    embeds = model.ln_vision(bench.image_embeds(3, seed=1))
    ids, mask = bench.texts(7, seed=2)
    k = 2
    i2t, t2i = retrieval_scores(model, embeds, ids, mask, k=k)
    unique = int(((i2t > -100) | (t2i.t() > -100)).sum())
    pairs = 3 * k + 7 * k
    config = model.config
    assert counted(lambda: retrieval_scores(model, embeds, ids, mask, k=k)) == bench.retrieval_flops(
        config, 3, 7, unique, shared_kv=True)
    assert counted(lambda: bench.reference_retrieval(model, embeds, ids, mask, k)) == bench.retrieval_flops(
        config, 3, 7, pairs, shared_kv=False)


def test_caption_flops(model):
    embeds = model.ln_vision(bench.image_embeds(2, seed=3))
    options = DecodingOptions(num_beams=3, max_new_tokens=4)
    assert caption_images(model, embeds, bench.EOS, options=options).shape[1] == 4  # no early eos
    config = model.config.qformer
    assert counted(lambda: caption_images(model, embeds, bench.EOS, options=options)) == bench.caption_flops(
        config, 2, 3, 4, cached=True)
    assert counted(lambda: bench.reference_caption(model, embeds, options)) == bench.caption_flops(
        config, 2, 3, 4, cached=False)
