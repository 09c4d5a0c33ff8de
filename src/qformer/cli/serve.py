"""``qformer serve``: its parser, the limits as options; :mod:`qformer.serve.server` loads the
model and runs the app."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from qformer.cli.options import require_tokenizer
from qformer.serve.limits import Limits

LIMIT_HELP = {
    "max_upload_bytes": "largest request body in bytes",
    "max_image_pixels": "largest image in pixels (decompression bombs are refused before decoding); lower than "
                        "the 64,000,000 of caption, vqa, retrieve and training, because a server decodes images "
                        "that anyone who reaches it sends, several at once",
    "max_prompt_chars": "longest prompt, question or text in characters",
    "max_new_tokens": "most new tokens a request may ask for",
    "max_num_beams": "widest beam search a request may ask for",
    "max_choices": "most choices (n) per /v1/chat/completions request",
    "max_texts": "most texts per /match request",
    "max_top": "most results per /search request",
    "request_timeout_s": "seconds a request may wait for its answer (then 504)",
    "max_batch": "most requests per model call",
    "max_wait_ms": "how long the first request of a batch waits for others",
    "max_queue": "requests that may wait; more answer 503 with Retry-After",
    "header_timeout_s": "seconds a client may take to send a request's headers (then 408 and the connection closed)",
    "body_timeout_s": "seconds the server waits for each next part of a request body (then 408)",
    "max_connections": "connections open at once; one more answers 503 with Retry-After and is closed",
}


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="an HTTP API and a web page for a model (captions, questions, image search)",
        description="Serve a stage-2 model (BLIP-2, InstructBLIP: /caption, /vqa) or a stage-1 model (/caption "
                    "by the Q-Former alone, as qformer caption; /match, /search over --gallery) with a web page at /, "
                    "OpenAPI at /docs, /healthz and /metrics.")
    serve.add_argument("--model", required=True, help="a model directory or hub id, or a training run (its final/)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if there is one)")
    serve.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto: the checkpoint's (default: auto)")
    serve.add_argument("--gallery", default=None, help="a folder of images for /search (stage-1 models); an "
                       "optional texts.txt in it (one per line) is what an image searches")
    serve.add_argument("--gallery-index", default=None,
                       help="where the gallery's features are kept (default: GALLERY/.qformer-index)")
    openai = serve.add_argument_group("the OpenAI-compatible routes (/v1/chat/completions, /v1/models; stage-2 models)")
    openai.add_argument("--served-model-name", default=None,
                        help="the model's id on the OpenAI routes (default: --model as given, as vLLM names it)")
    openai.add_argument("--api-key", default=None,
                        help="the key the /v1 routes ask for (Authorization: Bearer KEY); default: $QFORMER_API_KEY, "
                             "else none")
    openai.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template (as transformers' apply_chat_template reads it) that turns the "
                             "messages into the prompt (default: BLIP-2's 'Question: {} Answer:' turns; the "
                             "instruction as it is for InstructBLIP)")
    openai.add_argument("--allowed-local-media", default=None, metavar="DIR",
                        help="a folder whose images requests may name as file:///path (default: none)")
    openai.add_argument("--allow-url-fetch", action="store_true",
                        help="fetch http(s) image URLs, within the upload limits (default: data URLs only)")
    defaults = Limits()
    for field in fields(Limits):
        flag = "--" + field.name.replace("_", "-")
        serve.add_argument(flag, type=int if field.type == "int" else float, default=getattr(defaults, field.name),
                           dest=field.name, help=f"{LIMIT_HELP[field.name]} (default: {getattr(defaults, field.name)})")
    serve.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    from qformer.pretrained.auto import find_model
    from qformer.serve.server import load_served, run_server, server_parts

    limits = Limits(**{field.name: getattr(args, field.name) for field in fields(Limits)})  # checked before loading
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be within 1..65535, got {args.port}")
    found = find_model(args.model)  # a directory holding no model fails here, as for every command
    require_tokenizer(found, "serve")
    server_parts()  # what to install, said before the model loads
    openai = openai_options(args, found.name)
    served = load_served(found, args.device, args.dtype, args.gallery, args.gallery_index)
    run_server(served, limits, args.host, args.port, openai)
    return 0


def openai_options(args: argparse.Namespace, model_name: str):
    """The OpenAI routes' options from the command line, checked before the model loads: the
    template must render, the media folder must be one."""
    from qformer.serve.chat import OpenAIOptions, check_template

    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template {path}: no such file")
        template = path.read_text(encoding="utf-8")
        check_template(template, f"--chat-template {path}")
    media = None
    if args.allowed_local_media is not None:
        media = Path(args.allowed_local_media).resolve()
        if not media.is_dir():
            raise NotADirectoryError(f"--allowed-local-media {args.allowed_local_media}: not a folder")
    api_key = args.api_key if args.api_key is not None else os.environ.get("QFORMER_API_KEY") or None
    return OpenAIOptions(args.served_model_name or model_name, api_key, template, media, args.allow_url_fetch)
