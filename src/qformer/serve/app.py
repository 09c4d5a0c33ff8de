"""The HTTP API and the page of ``qformer serve`` (FastAPI, run by uvicorn).

Each POST route takes ``multipart/form-data`` (an image file and form fields, what a browser
sends) or ``application/json`` (the image as base64). Bad input answers 4xx with
``{"error": "<one line>"}``; an unexpected failure answers 500 with a generic message (the
traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qformer import __version__
from qformer.serve.batching import Batcher, QueueFull
from qformer.serve.metrics import Metrics
from qformer.serve.limits import Limits
from qformer.serve.service import VQA_PROMPT, Generation, Match, Search, ServedModel

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1


class RequestError(Exception):
    """A request the server refuses: its status and the one line the client reads."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` answers 413, whether its
    Content-Length says so up front or a chunked body grows past it while it is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _error(413, f"the request body is {int(length):,} bytes, over the limit of "
                                   f"{self.max_bytes:,} (max_upload_bytes)")
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise RequestError(413, f"the request body is over the limit of {self.max_bytes:,} bytes "
                                        "(max_upload_bytes)")
            return message

        await self.app(scope, counted, send)


class Counted:
    """ASGI middleware: each request's route, status and time into the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        route = scope["path"].strip("/").split("/")[0] or "page"
        route = route if route in KNOWN_ROUTES else "other"

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _body_schema(fields: dict[str, dict], required: list[str]) -> dict:
    """OpenAPI request bodies for both forms a POST route takes."""
    multipart = {k: ({"type": "string", "format": "binary"} if k == "image" else v) for k, v in fields.items()}
    as_json = {k: ({"type": "string", "format": "byte"} if k == "image" else v) for k, v in fields.items()}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": multipart, "required": required}},
        "application/json": {"schema": {"type": "object", "properties": as_json, "required": required}},
    }}}


INT, STR, BOOL = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
GENERATION_FIELDS = {"image": {}, "max_new_tokens": INT, "num_beams": INT, "stream": BOOL}


class Fields:
    """A request's fields, from a form or a JSON object, read with the limits."""

    def __init__(self, values: dict[str, Any], limits: Limits) -> None:
        self.values, self.limits = values, limits

    @classmethod
    async def read(cls, request: Request, limits: Limits) -> Fields:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                values = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the body is not valid JSON: {err}") from err
            if not isinstance(values, dict):
                raise RequestError(400, "the JSON body must be an object of fields")
            return cls(values, limits)
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

    async def image(self) -> Image.Image:
        value = self.values.get("image")
        if value is None:
            raise RequestError(422, "image: missing (a file in a form, or base64 in JSON)")
        if isinstance(value, UploadFile):
            data = await value.read()
        elif isinstance(value, str):
            try:
                data = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
            except (binascii.Error, ValueError) as err:
                raise RequestError(400, f"image: not valid base64 ({err})") from err
        else:
            raise RequestError(422, f"image: expected a file or a base64 string, got {type(value).__name__}")
        if not data:
            raise RequestError(400, "image: the file is empty")
        return await asyncio.to_thread(_decode, data, self.limits.max_image_pixels)

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
        if len(value) > self.limits.max_prompt_chars:
            raise RequestError(422, f"{name}: {len(value):,} characters, over the limit of "
                                    f"{self.limits.max_prompt_chars:,} (max_prompt_chars)")
        return value.strip()

    def integer(self, name: str, low: int, high: int, limit_name: str) -> int | None:
        value = self.values.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise RequestError(422, f"{name}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(422, f"{name}: expected an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise RequestError(422, f"{name}: {value} is outside {low}..{high} ({limit_name} {high})")
        return value

    def flag(self, name: str) -> bool:
        value = self.values.get(name, False)
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise RequestError(422, f"{name}: expected true or false, got {value!r}")
        return value

    def texts(self) -> list[str]:
        value = self.values.get("texts")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise RequestError(422, "texts: one or more non-empty strings")
        if len(items) > self.limits.max_texts:
            raise RequestError(422, f"texts: {len(items)}, over the limit of {self.limits.max_texts} (max_texts)")
        for text in items:
            if len(text) > self.limits.max_prompt_chars:
                raise RequestError(422, f"texts: one is {len(text):,} characters, over the limit of "
                                        f"{self.limits.max_prompt_chars:,} (max_prompt_chars)")
        return [text.strip() for text in items]


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    from qformer.data.transforms import load_image

    try:
        return load_image(io.BytesIO(data), max_pixels=max_pixels)
    except ValueError as err:
        raise RequestError(400, str(err).replace("max_image_pixels", "the server's max_image_pixels")) from err


def create_app(served: ServedModel, limits: Limits = Limits()) -> FastAPI:
    """The app serving ``served`` within ``limits``."""
    metrics = Metrics()
    batcher = Batcher(served.run_batch, limits.max_batch, limits.max_wait_ms / 1000, limits.max_queue,
                      on_batch=lambda key, size: metrics.batch_sizes.labels(key[0]).observe(size))
    metrics.queue_length.set_function(lambda: len(batcher))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        if served.gallery is not None:
            await batcher.call_on_model_thread(served.gallery.refresh)
        yield
        await batcher.stop()  # uvicorn has let the requests in flight finish; what is queued runs too

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from this server
    # (under /docs-assets), not from a CDN, so that they work where the server has no internet.
    app = FastAPIOffline(title="qformer", version=__version__, lifespan=lifespan, static_url="/docs-assets",
                         description=f"BLIP-2 model {served.name} ({served.kind}): routes {', '.join(served.routes)}")
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(Counted, metrics=metrics)  # outermost: it counts the 413s too

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return _error(500, "the server failed on this request (see its log)")

    def require(route: str) -> None:
        if route not in served.routes:
            raise RequestError(404, f"this {served.kind.replace('stage', 'stage-')} model answers {', '.join('/' + r for r in served.routes)}, "
                                    f"not /{route}")

    def submit(key: tuple, payload: Any) -> asyncio.Future:
        try:
            return batcher.submit(key, payload)
        except QueueFull as err:
            raise RequestError(503, f"the server is busy: {err}; retry in {RETRY_AFTER_S} s",
                               {"Retry-After": str(RETRY_AFTER_S)}) from err

    async def answer(key: tuple, payload: Any) -> Any:
        try:
            return await asyncio.wait_for(submit(key, payload), limits.request_timeout_s)
        except TimeoutError:
            raise RequestError(504, f"no answer within {limits.request_timeout_s:g} s (request_timeout)") from None
        except ValueError as err:  # what the model refuses names the input
            raise RequestError(400, str(err)) from err

    async def generation(route: str, request: Request) -> Response:
        require(route)
        fields = await Fields.read(request, limits)
        if route == "vqa":
            prompt = VQA_PROMPT.format(fields.text("question", required=True))
        else:
            prompt = fields.text("prompt") or ""
        max_new_tokens = fields.integer("max_new_tokens", 1, limits.max_new_tokens, "max_new_tokens")
        num_beams = fields.integer("num_beams", 1, limits.max_num_beams, "max_num_beams")
        stream = fields.flag("stream")
        if stream and (num_beams or 1) > 1:
            raise RequestError(422, "stream: streaming decodes one beam; pass num_beams 1, or stream false")
        payload = Generation(await fields.image(), prompt)
        settings = served.generation_settings(route, max_new_tokens, 1 if stream else num_beams, limits)
        if stream:
            return await streamed(route, payload, settings)
        return JSONResponse(await answer((route, tuple(sorted(settings.items()))), payload))

    async def streamed(route: str, payload: Generation, settings: dict[str, Any]) -> StreamingResponse:
        """Server-sent events: the text so far as the model thread emits it, then the whole
        answer (or the error), which comes after every text in the event queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # texts, then the request's future once it is done
        abandoned = threading.Event()  # set when the client goes away: the generation stops at its next token

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, text)

        start = time.perf_counter()
        future = submit(("stream", uuid.uuid4().hex), (payload, settings, emit, abandoned))
        future.add_done_callback(events.put_nowait)
        key = "caption" if route == "caption" else "answer"

        def event(kind: str, data: dict) -> str:
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        async def sse() -> AsyncIterator[str]:
            deadline = loop.time() + limits.request_timeout_s
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(events.get(), deadline - loop.time())
                    except TimeoutError:
                        message = f"no answer within {limits.request_timeout_s:g} s (request_timeout)"
                        yield event("error", {"error": message})
                        return
                    if isinstance(item, str):
                        yield f"data: {json.dumps({'text': item})}\n\n"
                        continue
                    if item.cancelled() or isinstance(item.exception(), ValueError):
                        yield event("error", {"error": "cancelled" if item.cancelled() else str(item.exception())})
                    elif item.exception() is not None:
                        logger.error("streamed /%s failed", route, exc_info=item.exception())
                        yield event("error", {"error": "the server failed on this request"})
                    else:
                        yield event("done", {key: item.result(), "seconds": time.perf_counter() - start})
                    return
            finally:
                abandoned.set()
                future.cancel()  # still queued: dropped unrun; running: stops at its next token

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/caption", openapi_extra=_body_schema({**GENERATION_FIELDS, "prompt": STR}, ["image"]))
    async def caption(request: Request) -> Response:
        """A caption of the image, after an optional prompt."""
        return await generation("caption", request)

    @app.post("/vqa", openapi_extra=_body_schema({**GENERATION_FIELDS, "question": STR}, ["image", "question"]))
    async def vqa(request: Request) -> Response:
        """A short answer to a question about the image."""
        return await generation("vqa", request)

    @app.post("/match", openapi_extra=_body_schema({"image": {}, "texts": {"type": "array", "items": STR}},
                                                    ["image", "texts"]))
    async def match(request: Request) -> Response:
        """ITM probability and ITC similarity of the image with each text."""
        require("match")
        fields = await Fields.read(request, limits)
        texts = fields.texts()
        return JSONResponse(await answer(("match",), Match(await fields.image(), texts)))

    @app.post("/search", openapi_extra=_body_schema({"text": STR, "image": {}, "top": INT}, []))
    async def search(request: Request) -> Response:
        """Text -> the gallery's images, or image -> the gallery's texts (texts.txt), best first."""
        require("search")
        fields = await Fields.read(request, limits)
        text = fields.text("text")
        has_image = fields.values.get("image") is not None
        if (text is None) == (not has_image):
            raise RequestError(422, "search: pass text (to find images) or image (to find texts), one of them")
        top = fields.integer("top", 1, limits.max_top, "max_top") or 5
        image = await fields.image() if has_image else None
        return JSONResponse(await answer(("search",), Search(text, image, top)))

    @app.get("/gallery/{name}")
    async def gallery_image(name: str) -> FileResponse:
        """A gallery image, by the name /search gives."""
        if served.gallery is None or name not in served.gallery.names:
            raise RequestError(404, f"no gallery image {name!r}")
        return FileResponse(served.gallery.folder / name)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """The model, its routes, the gallery's size and the limits."""
        gallery = None if served.gallery is None else {"images": len(served.gallery.names),
                                                       "texts": len(served.gallery.texts)}
        return {"model": served.name, "kind": served.kind, "routes": list(served.routes), "gallery": gallery,
                "limits": limits.public(), "version": __version__}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        """Prometheus text: requests by route and status, latencies, queue length, batch sizes."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        """The web page."""
        return HTMLResponse(resources.files("qformer.serve").joinpath("page.html").read_text(encoding="utf-8"))

    app.state.batcher, app.state.metrics = batcher, metrics
    return app


KNOWN_ROUTES = ("page", "caption", "vqa", "match", "search", "gallery", "info", "healthz", "metrics", "docs",
                "redoc", "docs-assets", "openapi.json")
