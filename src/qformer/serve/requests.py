"""A request's inputs, read and checked before it reaches the model: the fields of a form or a
JSON object, each within the server's limits, and the image decoded. Whatever is wrong with
them is a :class:`RequestError`: its 4xx status and one line that names the field."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import ctypes.util
import functools
import io
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from qformer.checks import one_line
from qformer.config import ImageConfig
from qformer.serve.limits import Limits


CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first


class RequestError(Exception):
    """A request the server refuses: its status and the one line the client reads; ``param``
    (the field at fault) and ``code`` go into OpenAI's error shape on the ``/v1`` routes."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.param, self.code = status, message, headers, param, code


# OpenAI's error types by status: its client raises BadRequestError, AuthenticationError, ... by status.
OPENAI_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error",
                      429: "rate_limit_error", 500: "server_error", 503: "server_busy", 504: "timeout_error"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None, *, openai: bool = False,
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """``{"error": message}``, or on the OpenAI routes (``openai``) OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``."""
    if not openai:
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    status = 400 if status == 422 else status  # OpenAI's API answers a field's bad value with 400, never 422
    kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes, whose errors take OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's JSON body, an object; a body that is not one is a 400 naming why (nested
    too deeply for the parser, an integer past Python's digit limit, not UTF-8, ...)."""
    try:
        values = json.loads(await request.body())
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply: send an object of fields") from None
    except ValueError as err:  # not JSON, not UTF-8, or an integer past Python's digit limit
        why = "a number of over 4,300 digits" if "integer string conversion" in str(err) else one_line(err)
        raise RequestError(400, f"the body is not valid JSON: {why}") from err
    if not isinstance(values, dict):
        raise RequestError(400, "the JSON body must be an object of fields")
    return values


def check_text(name: str, value: str, limits: Limits) -> None:
    """Within max_prompt_chars, and text the tokenizer can read: JSON's escapes can carry a
    lone UTF-16 surrogate ("\\ud800"), which no UTF-8 tokenizer takes."""
    if len(value) > limits.max_prompt_chars:
        raise RequestError(422, f"{name}: {len(value):,} characters, over the limit of "
                                f"{limits.max_prompt_chars:,} (max_prompt_chars)", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(422, f"{name}: not valid Unicode text (a lone surrogate, "
                                f"U+{ord(value[err.start]):04X}, at character {err.start + 1})", param=name) from None


class Fields:
    """A request's fields, from a form or a JSON object, read with the limits."""

    def __init__(self, values: dict[str, Any], limits: Limits) -> None:
        self.values, self.limits = values, limits

    @classmethod
    async def read(cls, request: Request, limits: Limits) -> Fields:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            return cls(await read_json_object(request), limits)
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            try:
                form = await request.form(max_files=1, max_fields=limits.max_texts + 16)
            except RequestError:
                raise
            except Exception as err:  # python-multipart's and starlette's parse errors
                raise RequestError(400, f"cannot read the form: {err}") from err
            values: dict[str, Any] = {}
            for key in form:
                items = form.getlist(key)
                values[key] = items if key == "texts" else items[0]
            return cls(values, limits)
        raise RequestError(415, "send multipart/form-data (an image file and fields) or application/json")

    async def image(self, config: ImageConfig) -> Image.Image:
        """The request's image, decoded and resized for a model whose preprocessing ``config``
        says (:func:`~qformer.data.transforms.eval_resized`): what waits in the queue is the
        model's input size, not the upload's."""
        value = self.values.get("image")
        if value is None:
            raise RequestError(422, "image: missing (a file in a form, or base64 in JSON)")
        if isinstance(value, UploadFile):
            data = await value.read()
        elif isinstance(value, str):
            data = base64_image(value, "image")
        else:
            raise RequestError(422, f"image: expected a file or a base64 string, got {type(value).__name__}")
        return await decoded(data, "image", self.limits, config)

    def text(self, name: str, required: bool = False) -> str | None:
        value = self.values.get(name)
        if value is None or (isinstance(value, str) and not value.strip() and not required):
            if required:
                raise RequestError(422, f"{name}: missing")
            return None
        if not isinstance(value, str):
            raise RequestError(422, f"{name}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RequestError(422, f"{name}: empty")
        check_text(name, value, self.limits)
        return value.strip()

    def integer(self, name: str, low: int, high: int, limit_name: str) -> int | None:
        value = self.values.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                shown = repr(value) if len(value) <= 20 else f"{len(value):,} characters"
                raise RequestError(422, f"{name}: expected an integer, got {shown}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(422, f"{name}: expected an integer, got {type(value).__name__}")
        if not low <= value <= high:
            shown = value if abs(value) < 10**12 else f"a {len(str(abs(value)))}-digit number"
            raise RequestError(422, f"{name}: {shown} is outside {low}..{high} ({limit_name} {high})")
        return value

    def flag(self, name: str) -> bool:
        value = self.values.get(name, False)
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise RequestError(422, f"{name}: expected true or false, got {type(value).__name__}")
        return value

    def texts(self) -> list[str]:
        value = self.values.get("texts")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise RequestError(422, "texts: one or more non-empty strings")
        if len(items) > self.limits.max_texts:
            raise RequestError(422, f"texts: {len(items)}, over the limit of {self.limits.max_texts} (max_texts)")
        for number, text in enumerate(items, 1):
            check_text(f"texts[{number}]", text, self.limits)
        return [text.strip() for text in items]


def base64_image(value: str, name: str) -> bytes:
    """The bytes of an image sent as base64 or as a data URL (``data:<type>;base64,<data>``)."""
    if value.startswith("data:"):
        header, comma, value = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(400, f"{name}: a data URL must be data:<type>;base64,<data>", param=name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{name}: not valid base64 ({one_line(err)})", param=name) from err


async def decoded(data: bytes, name: str, limits: Limits, config: ImageConfig) -> Image.Image:
    """``data`` decoded off the event loop, within the limits, at the model's size (:func:`decode_image`)."""
    if not data:
        raise RequestError(400, f"{name}: the file is empty", param=name)
    return await asyncio.to_thread(decode_image, data, limits.max_image_pixels, config)


def decode_image(data: bytes, max_pixels: int, config: ImageConfig) -> Image.Image:
    """The upload ``data`` decoded and resized for the model (``config``); after a large image,
    the memory its decoding freed goes back to the system (:func:`_return_freed_memory`)."""
    from qformer.data.transforms import eval_resized, load_image

    try:
        image = load_image(io.BytesIO(data), max_pixels=max_pixels)
    except ValueError as err:
        raise RequestError(400, str(err).replace("max_image_pixels", "the server's max_image_pixels")) from err
    pixels = image.width * image.height
    resized = eval_resized(image, config)
    del image
    if pixels >= LARGE_IMAGE_PIXELS:
        _return_freed_memory()
    return resized


LARGE_IMAGE_PIXELS = 4_000_000  # 16 MB as RGBA: decodes from here on give their memory back at once


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Release the pages that freed allocations left in glibc's arenas. Each decoding thread
    allocates from an arena of its own, and glibc keeps what is freed there for reuse: three
    6000x6000 images decoded at once left the server 210-260 MB larger for good, measured; after
    ``malloc_trim(0)`` it is back within a few MB. Elsewhere nothing is done."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
