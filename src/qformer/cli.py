"""The ``qformer`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qformer.convert.command import add_convert_command
from qformer.infer_command import add_inference_arguments, caption_command, vqa_command
from qformer.retrieve_command import add_retrieve_command
from qformer.train.command import add_train_commands


def _demo(args: argparse.Namespace) -> None:
    from qformer.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out_dir=args.out_dir, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 and its Q-Former.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="BLIP-2's two stages on built-in drawn scenes, no download")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out-dir", default="runs/demo")
    demo.set_defaults(run=_demo)
    caption = commands.add_parser("caption", help="caption images with a BLIP-2 model")
    add_inference_arguments(caption)
    caption.add_argument("--prompt", default=None, help="text the caption continues")
    caption.set_defaults(run=caption_command)
    vqa = commands.add_parser("vqa", help="answer a question about each image")
    add_inference_arguments(vqa)
    vqa.set_defaults(run=vqa_command)
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--prompt", default="Question: {} Answer:", help="the question's template")
    add_retrieve_command(commands)
    add_train_commands(commands)
    add_convert_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if getattr(args, "takes_overrides", False):
            status = args.run(args, overrides)
        else:
            status = args.run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
        print(f"qformer {args.command}: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: what was printed stays; files are written atomically
        print(f"qformer {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if status:
        raise SystemExit(status)
