"""``qformer demo``: BLIP-2's two stages on built-in drawn scenes (:mod:`qformer.demo` runs it)."""

from __future__ import annotations

import argparse
from typing import Any


def add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="BLIP-2's two stages on built-in drawn scenes, no download",
        description="BLIP-2 in miniature, end to end, on drawn scenes and the photographs scikit-image ships: a "
                    "small image encoder and a small language model are trained and frozen, then stage 1 (the "
                    "Q-Former: ITC, ITM, ITG; held-out retrieval recall) and stage 2 (captions through the frozen "
                    "LM; held-out exact match and CIDEr). OUT_DIR gets the models, report.md, loss curves and "
                    "captioned held-out images. Nothing is downloaded.")
    demo.add_argument("--seed", type=int, default=0, help="seed of the scenes and the weights")
    demo.add_argument("--out-dir", default="runs/demo", help="where the demo writes its models and figures")
    demo.set_defaults(run=demo_command)


def demo_command(args: argparse.Namespace) -> None:
    from qformer.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out_dir=args.out_dir, seed=args.seed))
