"""The ``qformer`` command line: the root parser and :func:`main`; each command's parser and
entry is a module of this package, named by the command (``infer`` for caption and vqa). Only
argparse at import: each command imports what it needs when it runs, so ``qformer --help``
answers at once. Hub ids download as transformers downloads them, unless ``HF_HUB_OFFLINE=1``
is set (the tests and CI set it). Nothing outside this package imports it (``python -m qformer``
and the ``qformer`` script call :func:`main`)."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

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


def did_you_mean(typos: list[tuple[str, str]]) -> str:
    """The hint after an error: ``; did you mean --model?`` for one typo, each typo's option
    named after it for several, nothing for none."""
    if not typos:
        return ""
    if len(typos) == 1:
        return f"; did you mean {typos[0][1]}?"
    return "; did you mean " + ", ".join(f"{option} (for {word})" for word, option in typos) + "?"


class Parser(argparse.ArgumentParser):
    """Every parser of the command, the subcommands' too (argparse makes them of the root's
    class). Abbreviations are off: with them ``--resum`` was silently ``--resume``, and a typo
    that happens to be a prefix went through. A mistyped command or choice, and an option that
    nearly names a real one, get a close match suggested: otherwise ``--modle`` was reported
    only as ``--model`` missing, which hides the typo."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.words: list[str] = []  # what the last parse read, for the hints of its errors

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """argparse's parse, remembering the words so that an error can name their typos."""
        self.words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.words, namespace)

    def typos(self, words: Sequence[str]) -> list[tuple[str, str]]:
        """``(word, option)`` for each word that names no option of this parser but nearly names
        one. A dotted word is a recipe override (``--model.bert``), never a typo."""
        options = [name for name in self._option_string_actions if name.startswith("--")]
        found = []
        for word in words:
            name = word.split("=", 1)[0]
            if name.startswith("-") and "." not in name and name not in self._option_string_actions:
                close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
                if close:
                    found.append((word, close[0]))
        return found

    def unrecognized(self, words: Sequence[str]) -> NoReturn:
        """Refuse words no option took, with the options they nearly name."""
        super().error(f"unrecognized arguments: {' '.join(words)}{did_you_mean(self.typos(words))}")

    def error(self, message: str) -> NoReturn:
        """argparse's error, led by the typos of the words parsed, when there are any: a required
        option reported missing is most often one mistyped."""
        typos = self.typos(self.words)
        if typos and not message.startswith("unrecognized arguments"):
            message = (f"unrecognized arguments: {' '.join(w for w, _ in typos)}{did_you_mean(typos)} "
                       f"Also: {message}")
        super().error(message)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a choice (a command's name too), with the closest choice suggested."""
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{err.message}; did you mean {close[0]!r}?") from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qformer", description="BLIP-2 and its Q-Former: train, convert, caption, answer.",
        epilog="Global options go before the command (qformer --log-level debug train ...). Model paths are local "
        "directories or hub ids, downloaded as transformers downloads them; HF_HUB_OFFLINE=1 keeps to local "
        "files and the Hugging Face cache.",
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


def command_parser(parser: argparse.ArgumentParser, name: str) -> Parser:
    """The parser of one command, whose options an error about its arguments names."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def _one_line(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"this needs the {err.name.split('.')[0]} package, which is not installed (pip install it)"
    text = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and "\n" in text.strip():
        text = re.sub(r"\s+", " ", text).strip()  # transformers' multi-line hub messages
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    command = command_parser(parser, args.command)
    if overrides and not getattr(args, "takes_overrides", False):
        command.unrecognized(overrides)
    typos = [word for word, _ in command.typos(overrides)]
    if typos:  # an override that nearly names an option (--resum) is that option mistyped, no recipe key
        command.unrecognized(typos)
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
