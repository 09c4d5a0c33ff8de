"""The HTTP API and the page of ``qformer serve`` (FastAPI, run by uvicorn).

Each POST route takes ``multipart/form-data`` (an image file and form fields, what a browser
sends) or ``application/json`` (the image as base64). Bad input answers 4xx with
``{"error": "<one line>"}``; an unexpected failure answers 500 with a generic message (the
traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from qformer import __version__
from qformer.serve.batching import Batcher, QueueFull
from qformer.serve.limits import RETRY_AFTER_S, Limits
from qformer.serve.metrics import Metrics
from qformer.serve.middleware import BodyLimit, Counted
from qformer.serve.openai_routes import add_openai_routes
from qformer.serve.requests import CLIENT_GONE, Fields, RequestError, error_response, is_openai_path
from qformer.serve.schemas import (
    EVERY_ROUTE,
    IMAGE,
    POSTED,
    Caption,
    Health,
    ImagesFound,
    Info,
    MatchScores,
    TextsFound,
    VqaAnswer,
    body_schema,
    or_events,
    refusals,
    request_fields,
)
from qformer.serve.chat import OpenAIOptions
from qformer.serve.service import VQA_PROMPT, Generation, Match, Search, ServedModel

logger = logging.getLogger(__name__)


async def client_gone(request: Request) -> None:
    """Return once the client of ``request`` (its body already read) has disconnected: the
    server's next message for a request whose body is read is ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


Handler = Callable[..., Coroutine[Any, Any, Any]]
MODEL_ROUTES = ("caption", "vqa", "match", "search", "gallery", "v1")  # each served by one kind of model only


def create_app(served: ServedModel, limits: Limits = Limits(), openai: OpenAIOptions | None = None) -> FastAPI:
    """The app serving ``served`` within ``limits``; a stage-2 model also on the OpenAI routes,
    as ``openai`` says (default: under the model's name, no API key, images as data URLs only)."""
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
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(Counted, metrics=metrics)  # outermost: it counts the 413s too

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message, err.headers, openai=is_openai_path(request.url.path),
                              param=err.param, code=err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}")

    # Only the routes the model serves are registered (and described); a request for one of the
    # other kind's routes still learns in a line which routes this server answers.
    served_paths = (*served.routes, "gallery") if served.kind == "stage1" else (*served.routes, "v1")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        route = request.url.path.strip("/").split("/")[0]
        openai_path = is_openai_path(request.url.path)
        if err.status_code == 404 and route in MODEL_ROUTES and route not in served_paths:
            return error_response(404, f"this {served.kind.replace('stage', 'stage-')} model answers "
                                       f"{', '.join('/' + r for r in served.routes)}, not /{route}", openai=openai_path)
        if err.status_code == 404 and openai_path:
            return error_response(404, f"no route {request.url.path}: the OpenAI routes here are "
                                       "/v1/chat/completions and /v1/models", openai=True)
        # a 405's Allow, for one
        return error_response(err.status_code, str(err.detail), err.headers, openai=openai_path)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(500, "the server failed on this request (see its log)",
                              openai=is_openai_path(request.url.path))

    def submit(key: tuple, payload: Any) -> asyncio.Future:
        try:
            return batcher.submit(key, payload)
        except QueueFull as err:
            raise RequestError(503, f"the server is busy: {err}; retry in {RETRY_AFTER_S} s",
                               {"Retry-After": str(RETRY_AFTER_S)}) from err

    async def answer(request: Request, key: tuple, payload: Any) -> Any:
        """The model's answer to ``payload``; the request leaves the queue unrun if its client
        hangs up first (499 in the metrics: no client reads it) or its time runs out (504)."""
        future = submit(key, payload)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait((future, gone), timeout=limits.request_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future.done():
            try:
                return future.result()
            except ValueError as err:  # what the model refuses names the input
                raise RequestError(400, str(err)) from err
        future.cancel()  # still queued: dropped unrun; in a batch already running: its result is dropped
        if gone.done() and not gone.cancelled():
            raise RequestError(CLIENT_GONE, "the client closed the connection before its answer")
        raise RequestError(504, f"no answer within {limits.request_timeout_s:g} s (request_timeout)")

    async def generation(route: str, request: Request) -> Any:
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
        payload = Generation(await fields.image(served.model.config.image), prompt)
        settings = served.generation_settings(route, max_new_tokens, 1 if stream else num_beams, limits)
        try:
            served.check_generation(payload.prompt, settings["max_new_tokens"])
        except ValueError as err:
            raise RequestError(400, str(err)) from err
        if stream:
            return await streamed(route, payload, settings)
        return await answer(request, (route, tuple(sorted(settings.items()))), payload)

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

    field_schemas = request_fields(limits)
    generating = ("image", "max_new_tokens", "num_beams", "stream")

    def only(kind: str, register: Callable[[Handler], Handler]) -> Callable[[Handler], Handler]:
        """``register`` on a ``kind`` model's server; on the other kind's the route is left out,
        so that the description lists only the routes this model serves."""
        return register if served.kind == kind else lambda handler: handler

    def posted(path: str, kind: str, model: Any, names: tuple[str, ...], required: list[str],
               extra: dict | None = None) -> Callable[[Handler], Handler]:
        """POST ``path`` on a ``kind`` model's server: its body's fields, its answer's model,
        every refusal."""
        body = body_schema({name: field_schemas[name] for name in names}, required)
        return only(kind, app.post(path, response_model=model, responses={**(extra or {}), **refusals(*POSTED)},
                                   openapi_extra=body))

    @posted("/caption", "stage2", Caption, (*generating, "prompt"), ["image"], or_events(Caption))
    async def caption(request: Request) -> Any:
        """A caption of the image, after an optional prompt."""
        return await generation("caption", request)

    @posted("/caption", "stage1", Caption, ("image", "max_new_tokens", "num_beams"), ["image"])
    async def qformer_caption(request: Request) -> Any:
        """A caption of the image by the Q-Former alone (a stage-1 model has no LLM), as qformer
        caption writes it: LAVIS's decoding unless the request sets beams or length."""
        fields = await Fields.read(request, limits)
        settings = {"max_new_tokens": fields.integer("max_new_tokens", 1, limits.max_new_tokens, "max_new_tokens"),
                    "num_beams": fields.integer("num_beams", 1, limits.max_num_beams, "max_num_beams")}
        payload = Generation(await fields.image(served.model.config.image), "")
        return await answer(request, ("caption", tuple(sorted((k, v) for k, v in settings.items() if v))), payload)

    @posted("/vqa", "stage2", VqaAnswer, (*generating, "question"), ["image", "question"], or_events(VqaAnswer))
    async def vqa(request: Request) -> Any:
        """A short answer to a question about the image."""
        return await generation("vqa", request)

    @posted("/match", "stage1", MatchScores, ("image", "texts"), ["image", "texts"])
    async def match(request: Request) -> Any:
        """ITM probability and ITC similarity of the image with each text."""
        fields = await Fields.read(request, limits)
        texts = fields.texts()
        return await answer(request, ("match",), Match(await fields.image(served.model.config.image), texts))

    @posted("/search", "stage1", ImagesFound | TextsFound, ("text", "image", "top"), [])
    async def search(request: Request) -> Any:
        """Text -> the gallery's images, or image -> the gallery's texts (texts.txt), best first."""
        fields = await Fields.read(request, limits)
        text = fields.text("text")
        has_image = fields.values.get("image") is not None
        if (text is None) == (not has_image):
            raise RequestError(422, "search: pass text (to find images) or image (to find texts), one of them")
        top = fields.integer("top", 1, limits.max_top, "max_top") or 5
        image = await fields.image(served.model.config.image) if has_image else None
        return await answer(request, ("search",), Search(text, image, top))

    @only("stage1", app.get("/gallery/{name}", response_class=StreamingResponse,
                            responses={**IMAGE, **refusals(404, 422, *EVERY_ROUTE)}))
    async def gallery_image(name: str) -> StreamingResponse:
        """A gallery image, by the name /search gives, streamed from the file that
        :meth:`Gallery.open_file` opened and checked (a regular file inside the folder): serving
        it by its path again would reopen whatever had been renamed over it since. An image gone
        or refused since it was indexed answers 404, naming it, not the server's folder."""
        if served.gallery is None or name not in served.gallery.names:
            raise RequestError(404, f"no gallery image {name!r}")
        try:
            file = await asyncio.to_thread(served.gallery.open_file, name)
        except ValueError as err:
            raise RequestError(404, f"gallery image {err}") from None
        size = os.fstat(file.fileno()).st_size

        def chunks() -> Iterator[bytes]:  # at most the size sent in Content-Length, if the file grows
            with file:
                left = size
                while left > 0 and (chunk := file.read(min(left, 1 << 16))):
                    left -= len(chunk)
                    yield chunk

        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return StreamingResponse(chunks(), media_type=media_type, headers={"Content-Length": str(size)})

    @app.get("/info", response_model=Info, responses=refusals(*EVERY_ROUTE))
    async def info() -> dict[str, Any]:
        """The model, its routes, the gallery's size and the limits."""
        gallery = None if served.gallery is None else {"images": len(served.gallery.names),
                                                       "texts": len(served.gallery.texts)}
        return {"model": served.name, "kind": served.kind, "routes": list(served.routes), "gallery": gallery,
                "limits": limits.public(), "version": __version__}

    @app.get("/healthz", response_model=Health, responses=refusals(*EVERY_ROUTE))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, responses=refusals(*EVERY_ROUTE))
    async def metrics_text() -> Response:
        """Prometheus text: requests by route and status, latencies, queue length, batch sizes."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, responses=refusals(*EVERY_ROUTE))
    async def page() -> HTMLResponse:
        """The web page."""
        return HTMLResponse(resources.files("qformer.serve").joinpath("page.html").read_text(encoding="utf-8"))

    if served.kind == "stage2":
        add_openai_routes(app, served, limits, openai or OpenAIOptions(served.name), submit, answer)
    app.state.batcher, app.state.metrics = batcher, metrics
    return app
