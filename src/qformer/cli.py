"""The ``qformer`` command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from qformer.demo import DemoConfig, run_demo

    run_demo(DemoConfig(steps=args.steps, seed=args.seed, out_dir=args.out_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 and its Q-Former.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train and caption on built-in data, no download")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out-dir", default="runs/demo")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    args.run(args)
