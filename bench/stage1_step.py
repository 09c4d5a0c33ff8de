"""Stage-1 training step: ours (image keys/values computed once and shared) against the plain
reference step of the tests (every pass projects the image again, as LAVIS does), same weights,
same batch, same negatives, one run. Forward + backward, precomputed image features.

    .venv/bin/python bench/stage1_step.py [--layers 12] [--batch 8] [--repeats 3]

Prints median times and the ratio (reference / ours: > 1 means ours is faster), and checks
that both give the same losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]
from stage1_helpers import reference_step  # noqa: E402
from timing import median_seconds  # noqa: E402

from qformer.config import Blip2Stage1Config, QFormerConfig  # noqa: E402
from qformer.losses import HardNegatives  # noqa: E402
from qformer.models.blip2 import Blip2Stage1  # noqa: E402
from qformer.stage1 import Stage1Objective  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Blip2Stage1Config(
        vision=None,
        qformer=QFormerConfig(num_hidden_layers=args.layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    )
    model = Blip2Stage1(config)
    b = args.batch
    ids = torch.randint(1000, 30000, (b, args.text))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    features = torch.randn(b, 257, 1408)
    negatives = HardNegatives(torch.roll(torch.arange(b), 1), torch.roll(torch.arange(b), 2), torch.ones(b, dtype=torch.bool))
    objective = Stage1Objective(model)

    def ours():
        model.zero_grad()
        out = objective(ids, mask, image_features=features, negatives=negatives)
        out.loss.backward()
        return out.loss

    def reference():
        model.zero_grad()
        loss = sum(reference_step(model, ids, mask, features, negatives.image, negatives.text))
        loss.backward()
        return loss

    torch.testing.assert_close(ours(), reference(), rtol=1e-5, atol=1e-5)
    t_ref, t_ours = median_seconds(reference, args.repeats), median_seconds(ours, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.layers}-layer Q-Former, batch {b}, "
          f"{args.text} text tokens, 257 image tokens of width 1408")
    print(f"reference step (image K/V per pass)  {t_ref * 1e3:8.1f} ms")
    print(f"qformer step (image K/V shared)      {t_ours * 1e3:8.1f} ms")
    print(f"ratio reference / ours               {t_ref / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
