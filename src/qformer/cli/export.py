"""``qformer export``: a training checkpoint written as a model that loads in one call
(:func:`qformer.train.export.export_run` does the work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_export_command(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a training checkpoint as a model that loads in one call",
        description="Write a run's checkpoint as the run's final/ is written: stage 1 in qformer's layout "
        "(Blip2Stage1.from_pretrained), stage 2 and InstructBLIP as complete transformers directories "
        "(Blip2.from_pretrained, transformers' Blip2ForConditionalGeneration), tokenizers and preprocessing "
        "included.")
    export.add_argument("checkpoint", help="a run folder (its last checkpoint) or one of its step_XXXXXXX folders")
    export.add_argument("out", help="the directory to write")
    export.add_argument("--overwrite", action="store_true", help="replace OUT when it holds files already")
    export.set_defaults(run=export_command)


def export_command(args: argparse.Namespace) -> None:
    from qformer.train.export import export_run

    print(f"wrote {export_run(args.checkpoint, args.out, overwrite=args.overwrite)}")
