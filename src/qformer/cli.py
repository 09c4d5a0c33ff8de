"""The ``qformer`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from qformer.demo import DemoConfig, run_demo

    run_demo(DemoConfig(steps=args.steps, seed=args.seed, out_dir=args.out_dir))


def _generation(args: argparse.Namespace) -> dict:
    options = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    return {k: v for k, v in options.items() if v is not None}


def _load(args: argparse.Namespace):
    from qformer.blip2 import Blip2

    return Blip2.from_pretrained(args.model)


def _print(rows: list[dict], key: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['image']}\t{row[key]}")


def _caption(args: argparse.Namespace) -> None:
    model = _load(args)
    captions = model.caption(args.images, prompt=args.prompt, **_generation(args))
    _print([{"image": i, "caption": c} for i, c in zip(args.images, captions)], "caption", args.json)


def _vqa(args: argparse.Namespace) -> None:
    model = _load(args)
    questions = [args.question] * len(args.images)
    answers = model.answer(args.images, questions, prompt=args.prompt, **_generation(args))
    rows = [{"image": i, "question": q, "answer": a} for i, q, a in zip(args.images, questions, answers)]
    _print(rows, "answer", args.json)


def _model_command(commands, name: str, help: str, run) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help)
    parser.add_argument("--model", required=True, help="a transformers-layout BLIP-2 directory or hub id")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 and its Q-Former.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train and caption on built-in data, no download")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out-dir", default="runs/demo")
    demo.set_defaults(run=_demo)
    caption = _model_command(commands, "caption", "caption images with a BLIP-2 model", _caption)
    caption.add_argument("--prompt", default=None, help="text the caption continues")
    vqa = _model_command(commands, "vqa", "answer a question about each image", _vqa)
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--prompt", default="Question: {} Answer:", help="the question's template")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"qformer {args.command}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
