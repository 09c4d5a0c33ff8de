"""The ``qformer`` command line. Only argparse at import: each command imports what it needs
when it runs, so ``qformer --help`` answers at once and ``HF_HUB_OFFLINE`` is set before
transformers is imported."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from qformer import __version__
from qformer.convert.parser import add_convert_command
from qformer.infer_command import add_inference_arguments, caption_command, vqa_command
from qformer.retrieve_command import add_retrieve_command
from qformer.serve.command import add_serve_command
from qformer.shards_command import add_shards_command
from qformer.train.command import add_train_commands

LOG_LEVELS = ("debug", "info", "warning", "error")
# what a user's mistake (or a run gone non-finite) raises; anything else is a bug and keeps its traceback
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
               ImportError, OSError, FloatingPointError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written; every option's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _demo(args: argparse.Namespace) -> None:
    from qformer.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out_dir=args.out_dir, seed=args.seed))


def _export(args: argparse.Namespace) -> None:
    from qformer.train.export import export_run

    print(f"wrote {export_run(args.checkpoint, args.out, overwrite=args.overwrite)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qformer", description="BLIP-2 and its Q-Former: train, convert, caption, answer.",
        epilog="Global options go before the command (qformer --log-level debug train ...). Model paths are local "
        "directories or hub ids; the command works offline (HF_HUB_OFFLINE=1) unless HF_HUB_OFFLINE=0 is set.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qformer {__version__}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="what the log shows")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    demo = commands.add_parser("demo", help="BLIP-2's two stages on built-in drawn scenes, no download")
    demo.add_argument("--seed", type=int, default=0, help="seed of the scenes and the weights")
    demo.add_argument("--out-dir", default="runs/demo", help="where the demo writes its models and figures")
    demo.set_defaults(run=_demo)
    caption = commands.add_parser("caption", help="caption images with a BLIP-2 model")
    add_inference_arguments(caption)
    caption.add_argument("--prompt", default=None, help="text the caption continues (default: none)")
    caption.set_defaults(run=caption_command)
    vqa = commands.add_parser("vqa", help="answer a question about each image")
    add_inference_arguments(vqa)
    vqa.set_defaults(run=vqa_command)
    vqa.add_argument("--question", required=True, help="the question asked of every image")
    vqa.add_argument("--prompt", default="Question: {} Answer:", help="the question's template")
    add_retrieve_command(commands)
    add_serve_command(commands)
    add_train_commands(commands)
    export = commands.add_parser(
        "export", help="a training checkpoint as a model that loads in one call",
        description="Write a run's checkpoint as the run's final/ is written: stage 1 in qformer's layout "
        "(Blip2Stage1.from_pretrained), stage 2 and InstructBLIP as complete transformers directories "
        "(Blip2.from_pretrained, transformers' Blip2ForConditionalGeneration), tokenizers and preprocessing "
        "included.")
    export.add_argument("checkpoint", help="a run folder (its last checkpoint) or one of its step_XXXXXXX folders")
    export.add_argument("out", help="the directory to write")
    export.add_argument("--overwrite", action="store_true", help="replace OUT when it holds files already")
    export.set_defaults(run=_export)
    add_convert_command(commands)
    add_shards_command(commands)
    for sub in commands.choices.values():
        sub.formatter_class = HelpFormatter
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"this needs the {err.name.split('.')[0]} package, which is not installed (pip install it)"
    text = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and "\n" in text.strip():
        text = re.sub(r"\s+", " ", text).strip()  # transformers' multi-line hub messages
    return text


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it; HF_HUB_OFFLINE=0 downloads
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        status = args.run(args, overrides) if getattr(args, "takes_overrides", False) else args.run(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"qformer {args.command}: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: what was printed stays; files are written atomically
        if args.debug:
            raise
        print(f"qformer {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if status:
        raise SystemExit(status)
