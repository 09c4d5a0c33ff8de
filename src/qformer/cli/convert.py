"""``qformer convert``: options only (argparse) at import, so that ``qformer --help`` starts at
once; :mod:`qformer.pretrained.conversion` does the work, :mod:`qformer.convert.formats` names the
layouts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qformer.convert.formats import FORMATS


def _run_convert(args: argparse.Namespace) -> None:
    """The CLI: convert, then print both reports."""
    from qformer.pretrained.conversion import convert, default_target

    to = args.to or default_target(args.dst)
    try:
        read, written = convert(args.src, args.dst, to, args.config, args.llm, args.vision, args.tokenizer)
    except KeyError as err:  # a key with no place: ConversionReport.raise_if_unmatched names them
        raise ValueError(err.args[0]) from None
    # One report: what reading and what writing left out, in that order (a key fails the
    # conversion before this when it has no place, so nothing here is unmatched).
    dropped = [*sorted(read.dropped.items()), *sorted(written.dropped.items())]
    print(f"read {args.src}\nwrote {args.dst} ({to})\ndropped {len(dropped)} key(s) on purpose")
    for key, why in dropped:
        print(f"  {key}: {why}")
    if to != "lavis" and not (args.dst / "tokenizer_config.json").is_file():
        print(f"note: {args.dst} holds no tokenizer (a LAVIS file has none), which caption, retrieve and serve "
              "need: convert again with --tokenizer (e.g. bert-base-uncased, LAVIS's, or a local copy of it)")


_EPILOG = """\
examples:
  qformer convert blip2_pretrained.pth out/stage1 --vision eva_vit_g.pth
  qformer convert blip2_pretrained_opt2.7b.pth out/blip2-opt --to transformers \\
      --llm opt-2.7b/ --vision eva_vit_g.pth --config image_token.json
  qformer convert out/blip2-opt blip2_opt.pth
"""


def add_convert_command(subparsers: Any) -> None:
    """Register ``convert`` on an argparse subparsers object (``run`` calls
    :func:`qformer.pretrained.conversion.convert` and prints its reports)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert BLIP-2 checkpoints between LAVIS (.pth), transformers and qformer",
        description="Convert a BLIP-2 checkpoint (stage 1, or stage 2 with an OPT or T5 LLM); prints what was "
        "dropped on purpose and fails on any key that has no place.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", type=Path, help=(
        "a LAVIS .pth file (read with weights_only=True), a transformers BLIP-2 directory or a qformer stage-1 "
        "directory: detected"))
    parser.add_argument("dst", type=Path, help="a directory, or a .pth file for --to lavis")
    parser.add_argument("--to", choices=FORMATS, help=(
        "transformers and qformer write safetensors (for stage 2 both are transformers' layout); lavis writes "
        "{'model': state_dict} with torch.save, a pickle of plain tensors. Default: lavis when DST ends in .pth "
        "or .pt, else qformer"))
    parser.add_argument("--config", type=Path, metavar="JSON", help=(
        "LAVIS sources: the architecture, as qformer's JSON config (fields left out take BLIP-2's official "
        'values: EVA ViT-g, BERT-base Q-Former, 32 queries; e.g. {"image_token_index": 50265} for --to '
        "transformers) or a transformers BLIP-2 config.json. Default: the official values"))
    parser.add_argument("--llm", type=Path, metavar="DIR", help=(
        "LAVIS stage-2 sources: the transformers directory of the LLM; its config.json gives the LLM's "
        "architecture, its weights fill language_model.* when the .pth has none (as LAVIS's released files), "
        "its tokenizer is kept"))
    parser.add_argument("--vision", type=Path, metavar="SRC", help=(
        "LAVIS sources without visual_encoder.* weights: where the image encoder comes from (LAVIS's "
        "eva_vit_g.pth, or a LAVIS, transformers or qformer checkpoint that has it)"))
    parser.add_argument("--tokenizer", metavar="DIR_OR_HUB_ID", help=(
        "stage-1 models: the Q-Former's BERT tokenizer, saved with the model ([DEC] added); LAVIS's .pth holds "
        "none, and caption, retrieve and serve need it (LAVIS's is bert-base-uncased). Default: the source's, if "
        "it has one"))
    parser.set_defaults(run=_run_convert)
