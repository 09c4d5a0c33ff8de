"""``qformer serve``: load a model, build the app, run it with uvicorn (SIGTERM or Ctrl-C: the
requests in flight finish, then the server exits)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from qformer.serve.limits import Limits

LIMIT_HELP = {
    "max_upload_bytes": "largest request body in bytes",
    "max_image_pixels": "largest image in pixels (decompression bombs are refused before decoding)",
    "max_prompt_chars": "longest prompt, question or text in characters",
    "max_new_tokens": "most new tokens a request may ask for",
    "max_num_beams": "widest beam search a request may ask for",
    "max_texts": "most texts per /match request",
    "max_top": "most results per /search request",
    "request_timeout_s": "seconds a request may wait for its answer (then 504)",
    "max_batch": "most requests per model call",
    "max_wait_ms": "how long the first request of a batch waits for others",
    "max_queue": "requests that may wait; more answer 503 with Retry-After",
}


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="an HTTP API and a web page for a model (captions, questions, image search)",
        description="Serve a stage-2 model (BLIP-2, InstructBLIP: /caption, /vqa) or a stage-1 model (/match, "
                    "/search over --gallery) with a web page at /, OpenAPI at /docs, /healthz and /metrics.")
    serve.add_argument("--model", required=True, help="a model directory or hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if there is one)")
    serve.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto: the checkpoint's (default: auto)")
    serve.add_argument("--gallery", default=None, help="a folder of images for /search (stage-1 models); an "
                       "optional texts.txt in it (one per line) is what an image searches")
    serve.add_argument("--gallery-index", default=None,
                       help="where the gallery's features are kept (default: GALLERY/.qformer-index)")
    defaults = Limits()
    for field in fields(Limits):
        flag = "--" + field.name.replace("_", "-")
        serve.add_argument(flag, type=int if field.type == "int" else float, default=getattr(defaults, field.name),
                           dest=field.name, help=f"{LIMIT_HELP[field.name]} (default: {getattr(defaults, field.name)})")
    serve.set_defaults(run=serve_command)


def load_served(name: str, device: str | None, dtype: str, gallery: str | None, gallery_index: str | None):
    """The model behind ``name`` (stage 1 or stage 2, told by its config) ready to serve."""
    from qformer.devices import default_device, parse_device, parse_dtype
    from qformer.loading import model_fingerprint, resolve_checkpoint
    from qformer.pretrained.stage1 import Blip2Stage1, stage1_layout_of
    from qformer.pretrained.stage2 import Blip2
    from qformer.serve.gallery import Gallery
    from qformer.serve.service import ServedModel

    options = {"dtype": parse_dtype(dtype), "device": parse_device(device or default_device())}
    directory = Path(resolve_checkpoint(name))
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{name} holds no config.json: expected a model directory (a training run's final/, "
                                "transformers' BLIP-2, InstructBLIP or Blip2ForImageTextRetrieval, qformer export's)")
    if stage1_layout_of(json.loads((directory / "config.json").read_text(encoding="utf-8"))) is None:
        if gallery is not None:  # the stage-2 loader names what it is if not stage 2 either
            raise ValueError(f"--gallery is searched by a stage-1 model; {name} is not one")
        return ServedModel(Blip2.from_pretrained(directory, **options), name)
    model = Blip2Stage1.from_pretrained(directory, **options)
    index = None if gallery is None else Gallery(model, gallery, model_fingerprint(directory), gallery_index)
    return ServedModel(model, name, index)


def serve_command(args: argparse.Namespace) -> int:
    import logging

    try:
        import uvicorn

        from qformer.serve.app import create_app
    except ModuleNotFoundError as err:
        raise ImportError(f"qformer serve needs {err.name}: pip install 'qformer[serve]' (FastAPI, uvicorn, "
                          "python-multipart, prometheus_client)") from err

    limits = Limits(**{field.name: getattr(args, field.name) for field in fields(Limits)})  # checked before loading
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be within 1..65535, got {args.port}")
    served = load_served(args.model, args.device, args.dtype, args.gallery, args.gallery_index)
    logging.getLogger(__name__).info("serving %s (%s) on http://%s:%d", args.model, served.kind, args.host, args.port)
    uvicorn.run(create_app(served, limits), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=int(limits.request_timeout_s) + 5)
    return 0
