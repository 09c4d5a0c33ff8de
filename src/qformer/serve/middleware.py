"""The server's ASGI middleware: the body's size and pace limits, and each request counted in
the metrics."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qformer.serve.metrics import Metrics
from qformer.serve.requests import CLIENT_GONE, RequestError, error_response, is_openai_path


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` answers 413, whether its
    Content-Length says so up front or a chunked body grows past it while it is read; a body
    whose next part does not come within ``timeout_s`` answers 408 and the connection closes
    (a stalled client must not hold a request, and its socket, for ever)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, f"the request body is {int(length):,} bytes, over the limit of "
                                           f"{self.max_bytes:,} (max_upload_bytes)", openai=is_openai_path(scope["path"]))
            return await response(scope, receive, send)
        seen, finished = 0, False

        async def counted() -> Message:
            nonlocal seen, finished
            if finished:  # once the body is in, a receive waits for the client to go away: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                # Connection: close, or uvicorn would keep reading the rest of the body after the answer.
                raise RequestError(408, f"the request body stopped: nothing came for {self.timeout_s:g} s "
                                        "(body_timeout_s)", {"Connection": "close"}) from None
            finished = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise RequestError(413, f"the request body is over the limit of {self.max_bytes:,} bytes "
                                        "(max_upload_bytes)")
            return message

        await self.app(scope, counted, send)


class Counted:
    """ASGI middleware: each request's route, status and time into the metrics. A response
    whose client went away before its end (a stream left half read) counts as 499, whatever
    status it started with: no client read it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        route = scope["path"].strip("/").split("/")[0] or "page"
        route = route if route in KNOWN_ROUTES else "other"
        answered = gone = False

        async def received() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not answered)
            return message

        async def sent(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
            answered = answered or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        try:
            await self.app(scope, received, sent)
        finally:
            self.metrics.requests.labels(route, str(CLIENT_GONE if gone else status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)



KNOWN_ROUTES = ("page", "caption", "vqa", "match", "search", "gallery", "v1", "info", "healthz", "metrics", "docs",
                "redoc", "docs-assets", "openapi.json")
