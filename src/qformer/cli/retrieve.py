"""``qformer retrieve``: the images of a folder (files, globs) that best match one or more text
queries, with a stage-1 model, as BLIP-2 retrieves (ITC candidates re-ranked by ITM + ITC)."""

from __future__ import annotations

import argparse
import json
import sys

from qformer.cli.options import add_device_arguments, device_options, require_tokenizer

_EPILOG = """\
Prints one JSON object per line and result: {"query", "rank", "image", "score"}, best first for
each query in the order given. Unreadable images are named on stderr and skipped; the exit
status is then 1, as for caption and vqa.

  qformer retrieve --model runs/stage1/final --images photos/ --query "a red car" --top 5
"""


def add_retrieve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrieve", help="rank images by how well they match text queries (a stage-1 model)",
        description="Rank images by how well they match text queries, as BLIP-2 retrieves: every image's ITC "
                    "similarity picks k candidates, ITM + ITC re-ranks them.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help=(
        "a stage-1 model directory or hub id: Blip2Stage1.save_pretrained's, a training run's final/, or "
        "transformers' Blip2ForImageTextRetrieval (Salesforce/blip2-itm-vit-g); required"))
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_GLOB", help=(
        "image files, folders (their image files, not recursive) or globs (quote them: 'photos/**/*.jpg'); "
        "required"))
    parser.add_argument("--query", action="append", required=True, help=(
        "a text to match; repeat it for several queries (the images are encoded once); required"))
    parser.add_argument("--top", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--k", type=int, default=128, help=(
        "ITC candidates re-ranked by ITM, BLIP-2's k (default: 128); --top must not exceed it"))
    add_device_arguments(parser, batch_size=32)
    parser.set_defaults(run=retrieve_command)


def retrieve_command(args: argparse.Namespace) -> int:
    from qformer.pretrained.auto import find_model, load_pretrained
    from qformer.retrieval import check_search_options, search

    check_search_options(args.top, args.k, args.batch_size)  # before the model loads
    options = device_options(args)
    found = find_model(args.model)  # a directory holding no model fails here, as for every command
    if found.kind != "stage1":
        raise ValueError(f"{args.model} holds {found.described}, not stage 1: retrieve ranks images with a stage-1 "
                         "model")
    require_tokenizer(found, "retrieve")
    model = load_pretrained(found, **options)
    result = search(model, args.images, args.query, top=args.top, k=args.k, batch_size=args.batch_size)
    for message in result.skipped:
        print(f"qformer retrieve: {message}", file=sys.stderr)
    if result.skipped:
        print(f"qformer retrieve: {len(result.skipped)} skipped (unreadable images, arguments naming none)",
              file=sys.stderr)
    for query, matches in zip(result.queries, result.matches, strict=True):
        for rank, (image, score) in enumerate(matches, start=1):
            print(json.dumps({"query": query, "rank": rank, "image": image, "score": score}), flush=True)
    return 1 if result.skipped else 0
