"""An OpenAI chat-completions request, read and checked: its model, the conversation turned into
the model's prompt by a chat template, its one image fetched and decoded, and the decoding
settings. Everything a request may not ask is a :class:`RequestError` naming the field (a 400,
which OpenAI's client raises as ``BadRequestError``); no field is silently ignored.

The conversation becomes a prompt through a Jinja chat template rendered by transformers'
``apply_chat_template``: BLIP-2's ``Question: {} Answer:`` turns by default, the instruction for
InstructBLIP, or the operator's ``--chat-template FILE``. The template sees each message's
content as a string: its text parts joined by a space (the image is not text: the queries it
makes go in front of the prompt).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image

from qformer.checks import one_line
from qformer.config import ImageConfig
from qformer.serve.completions import ChatSettings
from qformer.serve.gallery import open_inside
from qformer.serve.limits import Limits
from qformer.serve.requests import RequestError, base64_image, check_text, decoded

# BLIP-2's VQA prompt, one turn per question; a conversation's answers follow their questions,
# and a user turn without text (an image alone) adds nothing, so that an image alone is captioned.
BLIP2_TEMPLATE = (
    "{%- set ns = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set piece = 'Question: ' + message['content'] + ' Answer:' if message['content'] else '' -%}"
    "{%- else -%}{%- set piece = message['content'] -%}{%- endif -%}"
    "{%- if piece -%}{%- set ns.text = ns.text + (' ' if ns.text else '') + piece -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.text -}}"
)
# InstructBLIP reads the instruction as it is: the messages' texts, in order.
INSTRUCTION_TEMPLATE = (
    "{%- set ns = namespace(text='') -%}"
    "{%- for message in messages if message['content'] -%}"
    "{%- set ns.text = ns.text + (' ' if ns.text else '') + message['content'] -%}"
    "{%- endfor -%}"
    "{{- ns.text -}}"
)

# What a request may carry: these are honoured (the README says how); any other field is a 400.
HONOURED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
            "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream", "stream_options", "user")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI's API


@dataclass(frozen=True)
class OpenAIOptions:
    """How ``qformer serve`` answers the OpenAI routes: the model's name there, the API key
    (None: no key asked), the chat template (None: the model's default), where ``file://``
    images may be read from (None: nowhere) and whether ``http(s)`` images are fetched."""

    served_model_name: str
    api_key: str | None = None
    chat_template: str | None = None
    allowed_local_media: Path | None = None
    allow_url_fetch: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: the prompt, where its image is, how to decode, and how to answer."""

    prompt: str
    image_url: str
    settings: ChatSettings
    stream: bool
    include_usage: bool


def default_template(reads_instruction: bool) -> str:
    return INSTRUCTION_TEMPLATE if reads_instruction else BLIP2_TEMPLATE


def check_template(template: str, shown: str) -> None:
    """Refuse, in one line, a template that does not render a plain conversation (its syntax,
    or a variable it needs that apply_chat_template does not give)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    sample = [{"role": "user", "content": "What is this?"}]
    try:
        render_jinja_template(conversations=[sample], chat_template=template, add_generation_prompt=True)
    except Exception as err:
        raise ValueError(f"{shown} does not render a conversation: {one_line(err)}") from err


def read_chat_request(body: dict[str, Any], served_name: str, limits: Limits,
                      render: Callable[[list[dict[str, str]]], str],
                      default_max_tokens: Callable[[str], int]) -> ChatRequest:
    """``body`` checked field by field; ``render(messages) -> prompt`` applies the chat template;
    ``default_max_tokens(prompt)`` is the answer's length when the request gives none."""
    unknown = [shown(name) for name in body if name not in HONOURED]
    if unknown:
        raise RequestError(400, f"{unknown[0]}: not supported by qformer serve (it honours {', '.join(HONOURED)})",
                           param=unknown[0], code="unsupported_parameter")
    fields = {name: value for name, value in body.items() if value is not None}  # null is the field left out
    model = fields.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "model: missing (a string: GET /v1/models lists it)", param="model")
    if model != served_name:
        raise RequestError(404, f"The model `{shown(model)}` does not exist: this server serves `{served_name}`",
                           param="model", code="model_not_found")
    messages, image_url = _conversation(fields.get("messages"), limits)
    try:
        prompt = render(messages)
    except Exception as err:  # the template's own raise_exception, or a template that fails on this input
        raise RequestError(400, f"messages: the chat template refused them: {one_line(err)}",
                           param="messages") from err
    check_text("the prompt made from messages", prompt, limits)
    settings, stream, include_usage = _settings(fields, limits, default_max_tokens(prompt))
    if image_url is None:
        raise RequestError(400, "messages: no image; this model reads one, as an image_url content part of a "
                                "user message", param="messages")
    return ChatRequest(prompt, image_url, settings, stream, include_usage)


def _conversation(messages: Any, limits: Limits) -> tuple[list[dict[str, str]], str | None]:
    """The messages as the template reads them (role and text) and the one image's URL."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: a list of one or more messages", param="messages")
    turns, images = [], []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where}: a message is an object with role and content", param=where)
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise RequestError(400, f"{where}.role: {ascii(message.get('role'))} is not one of {', '.join(ROLES)}",
                               param=f"{where}.role")
        extra = sorted(shown(key) for key in set(message) - {"role", "content", "name"})
        if extra:
            raise RequestError(400, f"{where}.{extra[0]}: not supported by qformer serve (a message has role, "
                                    "content and name)", param=f"{where}.{extra[0]}", code="unsupported_parameter")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise RequestError(400, f"{where}.name: a string", param=f"{where}.name")
        if name is not None:
            check_text(f"{where}.name", name, limits)
        texts = []
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(400, f"{where}.content: a string or a list of content parts", param=f"{where}.content")
        for index, part in enumerate(parts):
            at = f"{where}.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"{at}.text: a string", param=f"{at}.text")
                check_text(at, part["text"], limits)
                texts.append(part["text"].strip())
            elif kind == "image_url" and role == "user":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise RequestError(400, f"{at}.image_url: an object with a url", param=f"{at}.image_url")
                images.append(url)
            elif kind == "image_url":
                raise RequestError(400, f"{at}: an image goes in a user message, not a {role} one", param=at)
            else:
                raise RequestError(400, f"{at}: a content part is text or image_url here, not {ascii(kind)}", param=at)
        turn = {"role": role, "content": " ".join(text for text in texts if text)}
        turns.append(turn if name is None else {**turn, "name": name})
    if len(images) > 1:
        raise RequestError(400, f"messages: {len(images)} images; BLIP-2 reads one image per request",
                           param="messages")
    return turns, images[0] if images else None


def _settings(fields: dict[str, Any], limits: Limits, default_max_tokens: int) -> tuple[ChatSettings, bool, bool]:
    max_tokens = _integer(fields, "max_tokens", 1, limits.max_new_tokens, "max_new_tokens")
    max_completion = _integer(fields, "max_completion_tokens", 1, limits.max_new_tokens, "max_new_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise RequestError(400, f"max_tokens {max_tokens} and max_completion_tokens {max_completion} differ: "
                                "send one of them", param="max_completion_tokens")
    n = _integer(fields, "n", 1, limits.max_choices, "max_choices") or 1
    temperature = _number(fields, "temperature", 0, 2, 0.0)
    top_p = _number(fields, "top_p", 0, 1, 1.0)
    if top_p == 0:
        raise RequestError(400, "top_p: must be above 0 (it keeps the tokens whose probabilities add up to it)",
                           param="top_p")
    stream = _flag(fields, "stream")
    logprobs = _flag(fields, "logprobs")
    top_logprobs = _integer(fields, "top_logprobs", 0, 20, "OpenAI's") or 0
    if top_logprobs and not logprobs:
        raise RequestError(400, "top_logprobs: needs logprobs true", param="top_logprobs")
    options = fields.get("stream_options", {})
    if "stream_options" in fields and not stream:
        raise RequestError(400, "stream_options: only with stream true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, "stream_options: an object whose one field is include_usage (true or false)",
                           param="stream_options")
    if stream and n > 1:
        raise RequestError(400, "n: a stream carries one choice here; pass n 1, or stream false", param="n")
    if stream and logprobs:
        raise RequestError(400, "logprobs: not sent in a stream here; pass stream false", param="logprobs")
    if not isinstance(fields.get("user", ""), str):
        raise RequestError(400, "user: a string (an id of the application's user; it changes nothing here)",
                           param="user")
    seed = _integer(fields, "seed", -(2**63), 2**64 - 1, "torch's seed range")
    settings = ChatSettings(
        max_new_tokens=max_tokens or max_completion or default_max_tokens, temperature=temperature,
        top_p=top_p if temperature > 0 else 1.0, n=n, stop=_stops(fields.get("stop")), seed=seed,
        presence_penalty=_number(fields, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=_number(fields, "frequency_penalty", -2, 2, 0.0),
        logprobs=logprobs, top_logprobs=top_logprobs)
    if settings.seed is not None and temperature == 0:
        settings = ChatSettings(**{**settings.__dict__, "seed": None})  # greedy decoding draws nothing
    return settings, stream, bool(options.get("include_usage", False))


def shown(text: str, most: int = 80) -> str:
    """A client's string as a message may quote it: cut to ``most`` characters, and a lone
    surrogate (which no UTF-8 answer can carry) written as its escape."""
    text = text if len(text) <= most else text[:most] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _integer(fields: dict[str, Any], name: str, low: int, high: int, limit: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name}: expected an integer, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        shown = value if abs(value) < 10**21 else f"a {len(str(abs(value)))}-digit number"
        raise RequestError(400, f"{name}: {shown} is outside {low}..{high} ({limit} limit)", param=name)
    return value


def _number(fields: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(400, f"{name}: expected a number, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise RequestError(400, f"{name}: {value:g} is outside {low:g}..{high:g}", param=name)
    return float(value)


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name}: expected true or false, got {type(value).__name__}", param=name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(400, f"stop: a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    return tuple(stops)


async def fetch_image(url: str, options: OpenAIOptions, limits: Limits, config: ImageConfig) -> Image.Image:
    """The image at ``url`` decoded for the model, within the same limits as an upload: a data
    URL; a ``file://`` path inside ``--allowed-local-media``; an ``http(s)`` URL where
    ``--allow-url-fetch`` allows it, at most ``max_upload_bytes`` read within ``body_timeout_s``."""
    name = "image_url"
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = base64_image(url, name)
    elif scheme == "file":
        if options.allowed_local_media is None:
            raise RequestError(400, f"{name}: file:// images are not read here (the server names a folder for them "
                                    "with --allowed-local-media)", param=name)
        data = await asyncio.to_thread(_local_file, url, options.allowed_local_media, limits)
    elif scheme in ("http", "https"):
        if not options.allow_url_fetch:
            raise RequestError(400, f"{name}: {scheme} URLs are not fetched here (the server allows them with "
                                    "--allow-url-fetch); send the image as a data URL", param=name)
        data = await _download(url, limits)
    else:
        raise RequestError(400, f"{name}: a data:, file:// or http(s) URL, not {scheme}:", param=name)
    return await decoded(data, name, limits, config)


def _local_file(url: str, root: Path, limits: Limits) -> bytes:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RequestError(400, "image_url: a file:// URL names a file on this server: file:///path", param="image_url")
    path = Path(unquote(parts.path))
    try:
        with open_inside(root, path, path.name, "--allowed-local-media's") as file:
            data = file.read(limits.max_upload_bytes + 1)
    except ValueError as err:
        raise RequestError(400, f"image_url: {err}", param="image_url") from None
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"image_url: the file is over the limit of {limits.max_upload_bytes:,} bytes "
                                "(max_upload_bytes)", param="image_url")
    return data


async def _download(url: str, limits: Limits) -> bytes:
    import httpx

    async def read() -> bytes:
        async with httpx.AsyncClient(follow_redirects=True, max_redirects=3, timeout=limits.body_timeout_s) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise RequestError(400, f"image_url: the URL answered {response.status_code}", param="image_url")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limits.max_upload_bytes:
                    raise RequestError(413, f"image_url: the image is over the limit of {limits.max_upload_bytes:,} "
                                            "bytes (max_upload_bytes)", param="image_url")
            return bytes(data)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(400, f"image_url: not fetched within {limits.body_timeout_s:g} s (body_timeout_s)",
                           param="image_url") from None
    except httpx.HTTPError as err:
        raise RequestError(400, f"image_url: could not be fetched ({type(err).__name__})", param="image_url") from None
