"""The ``qformer`` command line: the root parser and :func:`main`; each command's parser and
entry is a module of this package, named by the command (``infer`` for caption and vqa). Only
argparse at import: each command imports what it needs when it runs, so ``qformer --help``
answers at once and ``HF_HUB_OFFLINE`` is set before transformers is imported. Nothing outside
this package imports it (``python -m qformer`` and the ``qformer`` script call :func:`main`)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from qformer import __version__
from qformer.cli.convert import add_convert_command
from qformer.cli.demo import add_demo_command
from qformer.cli.eval import add_eval_command
from qformer.cli.export import add_export_command
from qformer.cli.infer import add_infer_commands
from qformer.cli.retrieve import add_retrieve_command
from qformer.cli.serve import add_serve_command
from qformer.cli.shards import add_shards_command
from qformer.cli.train import add_train_command

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
    add_demo_command(commands)
    add_infer_commands(commands)
    add_retrieve_command(commands)
    add_serve_command(commands)
    add_train_command(commands)
    add_eval_command(commands)
    add_export_command(commands)
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
