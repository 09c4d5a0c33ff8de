"""``qformer export``: a training checkpoint written as a model that loads in one call
(:func:`qformer.train.export.export_run` does the work), or with ``--format`` a model's image
path written as ONNX graphs or torch.export programs (:func:`qformer.export.writer.export_directory`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_export_command(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a training checkpoint as a model that loads in one call; a model's image path as ONNX",
        description="Without --format: write a run's checkpoint as the run's final/ is written: stage 1 in qformer's "
        "layout (Blip2Stage1.from_pretrained), stage 2 and InstructBLIP as complete transformers directories "
        "(Blip2.from_pretrained, transformers' Blip2ForConditionalGeneration), tokenizers and preprocessing "
        "included. With --format onnx|torch-export: write a MODEL directory's image path as graphs with a dynamic "
        "batch (stage 2: image_prefix, pixels -> the LLM's input prefix; stage 1: image_features and "
        "text_features), with export.json, the tokenizer and preprocessor_config.json beside them; "
        "qformer.onnx runs the ONNX folder without torch.")
    export.add_argument("checkpoint", metavar="SOURCE",
                        help="a run folder (its last checkpoint) or one of its step_XXXXXXX folders; with --format, "
                        "a model directory or hub id")
    export.add_argument("out", help="the directory to write")
    export.add_argument("--format", choices=("onnx", "torch-export"), default=None,
                        help="export SOURCE's image path as ONNX graphs (.onnx) or torch.export programs (.pt2)")
    export.add_argument("--dtype", default=None,
                        help="with --format: the dtype the model is traced in, float32 (default) or float16 "
                        "(torch-export also bfloat16); the graphs take float32 pixels")
    export.add_argument("--overwrite", action="store_true", help="replace OUT when it holds files already")
    export.set_defaults(run=export_command)


def export_command(args: argparse.Namespace) -> None:
    if args.format is None:
        if args.dtype is not None:
            raise ValueError("--dtype is for --format onnx|torch-export; a training checkpoint is written as it is")
        from qformer.train.export import export_run

        print(f"wrote {export_run(args.checkpoint, args.out, overwrite=args.overwrite)}")
        return
    from qformer.export.writer import export_directory

    out = export_directory(args.checkpoint, args.out, args.format, args.dtype or "float32", overwrite=args.overwrite)
    print(f"wrote {out}")
