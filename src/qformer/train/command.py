"""``qformer train`` and ``qformer eval``: the argument parsers and what they run. Only argparse
at import: the training code is imported when a command runs."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from qformer.train.config import load_train_config
    from qformer.train.loop import train

    result = train(load_train_config(args.recipe, overrides), resume=args.resume)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


def _eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from qformer.train.config import load_train_config
    from qformer.train.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(load_train_config(args.recipe, overrides), args.checkpoint, args.out)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


def add_train_commands(commands: Any) -> None:
    """Register ``train`` and ``eval`` on an argparse subparsers object."""
    train = commands.add_parser("train", help="train from a YAML recipe; --section.key value overrides it")
    train.add_argument("recipe", help="a YAML recipe, e.g. configs/stage1.yaml")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.set_defaults(run=_train, takes_overrides=True)
    evaluate = commands.add_parser("eval", help="evaluate a training checkpoint on the recipe's held-out data")
    evaluate.add_argument("recipe")
    evaluate.add_argument("--checkpoint", required=True, help="a step_XXXXXXX folder of a run")
    evaluate.add_argument("--out", default=None, help="where to write the results JSON")
    evaluate.set_defaults(run=_eval, takes_overrides=True)
