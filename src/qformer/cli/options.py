"""What several commands share: the device, dtype and batch-size options; a result printed once."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_device_arguments(parser: argparse.ArgumentParser, batch_size: int = 8) -> None:
    """``--device``, ``--dtype`` and ``--batch-size``, read by :func:`device_options`."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if there is one)")
    parser.add_argument("--dtype", default="auto",
                        help="float32, float16, bfloat16 (fp32, fp16, bf16, ...) or auto: the checkpoint's (default: auto)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images per forward pass (default: {batch_size})")


def device_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--batch-size``, ``--dtype``, ``--device`` (and ``--device-map`` where a command has it)
    checked before anything loads: the keywords of ``from_pretrained``."""
    from qformer.devices import default_device, parse_device, parse_dtype

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    options: dict[str, Any] = {"dtype": parse_dtype(args.dtype)}  # bad spellings fail here
    device_map = getattr(args, "device_map", None)
    if device_map is not None:
        if args.device is not None:
            raise ValueError("pass --device or --device-map, not both")
        return options | {"device_map": device_map}
    return options | {"device": parse_device(args.device or default_device())}


def require_tokenizer(found: Any, command: str) -> None:
    """Refuse, before it loads, a stage-1 model saved without its tokenizer (what ``qformer
    convert`` writes from a LAVIS file when not given one), in the command line's words: the
    library's own message would say to set ``model.tokenizer`` in Python. ``found`` is what
    :func:`qformer.pretrained.auto.find_model` found."""
    if found.kind == "stage1" and not (found.directory / "tokenizer_config.json").is_file():
        raise ValueError(f"{found.name} holds no tokenizer, which {command} needs (a LAVIS file has none): convert "
                         f"it again with qformer convert SRC.pth {found.name} --tokenizer bert-base-uncased (LAVIS's "
                         "Q-Former tokenizer, or a local copy of it)")


def is_main_process() -> bool:
    """Rank 0 of torchrun's processes (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def print_result(result: dict[str, Any]) -> None:
    if is_main_process():
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
