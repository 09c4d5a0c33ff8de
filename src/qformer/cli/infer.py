"""``qformer caption`` and ``qformer vqa``: many images (files, folders, globs) through a
BLIP-2 or InstructBLIP checkpoint, in batches, on any device and dtype; one result per image as
it comes, an unreadable image reported by name while the others are still answered."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qformer.cli.options import add_device_arguments, device_options, require_tokenizer
from qformer.data.image_files import batches, expand_images


def add_infer_commands(commands: Any) -> None:
    """Register ``caption`` and ``vqa`` on an argparse subparsers object."""
    caption = commands.add_parser(
        "caption", help="caption images with a BLIP-2 model (or a stage-1 model's Q-Former)",
        description="Caption images with a stage-2 model (BLIP-2, InstructBLIP: its LLM writes the caption) or "
                    "a stage-1 model (its Q-Former alone writes it, as LAVIS's Blip2Qformer.generate; no --prompt). "
                    "qformer serve answers /caption the same way for either.")
    add_inference_arguments(caption)
    caption.add_argument("--prompt", default=None, help="text the caption continues (default: none)")
    caption.set_defaults(run=caption_command)
    vqa = commands.add_parser("vqa", help="answer a question about each image")
    add_inference_arguments(vqa)
    vqa.set_defaults(run=vqa_command)
    vqa.add_argument("--question", required=True, help="the question asked of every image")
    vqa.add_argument("--prompt", default="Question: {} Answer:", help="the question's template")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    stage1 = ", or a stage-1 model in qformer's layout" if parser.prog.endswith("caption") else ""
    parser.add_argument("--model", required=True, help=f"a BLIP-2 / InstructBLIP directory or hub id{stage1}; a "
                        "training run folder means its final/")
    parser.add_argument("images", nargs="+", help="image files, folders or globs (quote a glob: 'photos/**/*.jpg')")
    parser.add_argument("--json", action="store_true", help="one JSON object per line, as results come")
    add_device_arguments(parser)
    parser.add_argument("--device-map", default=None,
                        help="auto: spread the LLM over every GPU (and the CPU) (default: one device)")
    parser.add_argument("--num-beams", type=int, help="beam width (default: 5, as BLIP-2)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: caption 30, vqa 10)")


def load_model(args: argparse.Namespace):
    """A BLIP-2 / InstructBLIP model; for ``qformer caption``, a stage-1 model too (its Q-Former
    captions alone, as LAVIS's ``Blip2Qformer.generate``)."""
    from qformer.pretrained.auto import find_model, load_pretrained

    options = device_options(args)
    found = find_model(args.model)  # a directory holding no model fails here, as for every command
    if found.kind == "stage1" and args.command == "vqa":
        raise ValueError(f"{args.model} holds {found.described}: vqa answers with a stage-2 model (BLIP-2, "
                         "InstructBLIP)")
    if found.layout == "transformers":
        raise ValueError(f"{args.model} is transformers' Blip2ForImageTextRetrieval, which has no Q-Former LM "
                         "head: caption with a stage-1 model in qformer's layout (a training run's final/, or "
                         "LAVIS's blip2_pretrained.pth through qformer convert)")
    if found.kind == "stage1" and args.prompt:
        raise ValueError("a stage-1 model captions from [DEC] alone: --prompt needs a BLIP-2 model with an LLM")
    require_tokenizer(found, args.command)
    return load_pretrained(found, **options)


def run_images(args: argparse.Namespace, answer_batch, result_key: str, extra: dict[str, Any]) -> int:
    """Load the model, then answer every readable image batch by batch, printing as results come;
    returns the exit status (1 when an image could not be read or an argument named none)."""
    from tqdm import tqdm

    from qformer.data.transforms import load_image

    for flag, value in (("--num-beams", args.num_beams), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    images, problems = expand_images(args.images)
    for problem in problems:
        print(f"qformer {args.command}: {problem}", file=sys.stderr)
    if not images:
        raise ValueError("no images to read")
    model = load_model(args)
    generation = {k: v for k, v in {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}.items()
                  if v is not None}
    failed = 0
    with tqdm(total=len(images), unit="image", file=sys.stderr, disable=None) as progress:
        for names in batches(images, args.batch_size):
            rows: dict[str, dict[str, Any]] = {}
            readable: list[tuple[str, Any]] = []
            for name in names:
                try:
                    readable.append((name, load_image(name)))
                except ValueError as err:
                    rows[name] = {"image": name, "error": str(err)}
            if readable:
                results = answer_batch(model, [image for _, image in readable], generation)
                for (name, _), result in zip(readable, results, strict=True):
                    rows[name] = {"image": name, **extra, result_key: result}
            for name in names:  # in the order given
                emit(args, rows[name], result_key)
            failed += len(names) - len(readable)
            progress.update(len(names))
    if failed:
        print(f"qformer {args.command}: {failed} of {len(images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed or problems else 0


def emit(args: argparse.Namespace, row: dict[str, Any], key: str) -> None:
    """One line per image: JSON with ``--json`` (errors too, on stdout), else tab-separated."""
    if args.json:
        print(json.dumps(row), flush=True)
    elif "error" in row:
        print(f"qformer {args.command}: {row['error']}", file=sys.stderr, flush=True)
    else:
        print(f"{row['image']}\t{row[key]}", flush=True)


def caption_command(args: argparse.Namespace) -> int:
    def caption(model, images, gen):
        from qformer.pretrained.stage1 import Blip2Stage1
        from qformer.retrieval import caption_texts

        if isinstance(model, Blip2Stage1):
            return caption_texts(model, images, **gen)
        return model.caption(images, prompt=args.prompt, **gen)

    return run_images(args, caption, "caption", {})


def vqa_command(args: argparse.Namespace) -> int:
    def answer(model, images, gen):
        return model.answer(images, [args.question] * len(images), prompt=args.prompt, **gen)

    return run_images(args, answer, "answer", {"question": args.question})
