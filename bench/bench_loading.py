"""``load``: the loader's full-size figures (bench/full_size.py): ``Blip2.from_pretrained``
against transformers' ``Blip2ForConditionalGeneration.from_pretrained(dtype=torch.bfloat16)``
on random weights with blip2-opt-2.7b's shapes (bf16 shards), each side in a fresh process from
a warm page cache, the sides alternating. ``ours_s`` / ``ref_s``: seconds from the process's
start to the first caption (greedy, 8 new tokens), the load included; the load alone and the peak
RSS of each side go in ``extra``. The tokens must be identical. Quick: ``tiny-opt``.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import full_size
from harness import Result

TARGET = "identical tokens; speedup >= 1.0 (first caption), load no slower, peak_mem_ratio <= 1.0"
CACHE = Path(os.path.expanduser("~/.cache/qformer-bench"))


def bench_load(quick: bool, device: str) -> Result:
    name, rounds = ("tiny-opt", 1) if quick else ("blip2-opt-2.7b", 2)
    directory = full_size.checkpoint(CACHE, name)
    image = full_size.bench_image(CACHE / "bench.png")
    runs: dict[str, list[dict]] = {"qformer": [], "transformers": []}
    for _ in range(rounds):  # alternating, each run a fresh process
        for side, found in runs.items():
            found.append(full_size.run_side(side, directory, image, "bfloat16", device))
    tokens = {side: found[0]["tokens"] for side, found in runs.items()}
    assert all(run["tokens"] == tokens["transformers"] for found in runs.values() for run in found), tokens

    def median(side: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[side])

    def spread(side: str, key: str) -> float:
        values = [run[key] for run in runs[side]]
        return max(values) - min(values)

    weights = full_size.weight_bytes(directory, "bfloat16") / full_size.GIB
    ours_rss, ref_rss = median("qformer", "peak_rss_gib"), median("transformers", "peak_rss_gib")
    return Result(
        "load", ours_s=median("qformer", "first_caption_s"), ref_s=median("transformers", "first_caption_s"),
        max_abs_diff=None, peak_mem_ratio=ours_rss / ref_rss,
        extra={"target": TARGET, "tokens_identical": True, "checkpoint": f"{name} (bf16 shards)",
               "dtype": "bfloat16", "weights_gib": weights, "rounds": rounds, "timed": "start to first caption",
               "ours_spread_s": spread("qformer", "first_caption_s"),
               "ref_spread_s": spread("transformers", "first_caption_s"),
               "ours_load_s": median("qformer", "load_s"), "ref_load_s": median("transformers", "load_s"),
               "load_speedup": median("transformers", "load_s") / median("qformer", "load_s"),
               "ours_peak_rss_gib": ours_rss, "ref_peak_rss_gib": ref_rss},
    )


BENCHMARKS = {"load": bench_load}
