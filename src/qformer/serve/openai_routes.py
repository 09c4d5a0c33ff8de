"""The OpenAI-compatible routes of ``qformer serve``: ``POST /v1/chat/completions`` and
``GET /v1/models``, so that OpenAI's clients, and the applications and gateways built on them,
call a BLIP-2 or InstructBLIP model as they call vLLM.

The chat requests share everything with the native routes: the dynamic batching (requests with
equal settings run as one batch; a seeded request alone, so that its draw is its own), the
bounded queue, the limits and the metrics. Their answers and errors take OpenAI's shapes, so
that the client parses them and raises its own exception types.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from qformer.serve.chat import ChatRequest, OpenAIOptions, default_template, fetch_image, read_chat_request
from qformer.serve.completions import Completion
from qformer.serve.limits import Limits
from qformer.serve.requests import RequestError, read_json_object
from qformer.serve.service import Generation, ServedModel

Submit = Callable[[tuple, Any], asyncio.Future]
Answer = Callable[[Request, tuple, Any], Coroutine[Any, Any, Any]]


def add_openai_routes(app: FastAPI, served: ServedModel, limits: Limits, options: OpenAIOptions,
                      submit: Submit, answer: Answer) -> None:
    """Register the ``/v1`` routes on ``app`` (a stage-2 model's): ``submit`` queues a request
    and ``answer`` waits for its result, as the native routes do."""
    template = options.chat_template or default_template(served.model.reads_instruction)
    name = options.served_model_name
    started = int(time.time())

    def authorize(request: Request) -> None:
        """With an API key set, ``Authorization: Bearer <key>``, compared in constant time."""
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise RequestError(401, "Incorrect or missing API key: send the header Authorization: Bearer <key>",
                               code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "qformer"}

    @app.get("/v1/models", include_in_schema=False)
    async def models(request: Request) -> dict[str, Any]:
        """The served model, as OpenAI's model list."""
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", include_in_schema=False)
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if model_id != name:
            raise RequestError(404, f"The model `{model_id}` does not exist: this server serves `{name}`",
                               param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request) -> Any:
        """A completion of the conversation, in OpenAI's shape (or its chunks, streamed)."""
        authorize(request)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "send the request as application/json")
        chat = read_chat_request(await read_json_object(request), name, limits,
                                 lambda messages: served.render_chat(messages, template),
                                 lambda prompt: served.room_for_new_tokens(prompt, limits))
        try:
            served.check_generation(chat.prompt, chat.settings.max_new_tokens)
        except ValueError as err:
            raise RequestError(400, str(err), param="max_tokens", code="context_length_exceeded") from err
        payload = Generation(await fetch_image(chat.image_url, options, limits, served.model.config.image),
                             chat.prompt)
        prompt_tokens = served.prompt_tokens(chat.prompt)
        reply = Reply(name, prompt_tokens)
        if chat.stream:
            return streamed(chat, payload, reply)
        # Requests with equal settings batch; a seeded one decodes alone, so that its draw is its own.
        key = ("chat", chat.settings) if chat.settings.seed is None else ("chat", chat.settings, uuid.uuid4().hex)
        completions: list[Completion] = await answer(request, key, payload)
        return reply.completion(completions)

    def streamed(chat: ChatRequest, payload: Generation, reply: Reply) -> StreamingResponse:
        """OpenAI's stream: ``chat.completion.chunk`` events (the role, the text in pieces, the
        finish reason, then the usage if asked), then ``data: [DONE]``. Stop strings are held
        back while they may still be forming, so that the pieces join to the plain answer."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # texts so far, then the request's future once it is done
        abandoned = threading.Event()  # set when the client goes away: the generation stops at its next token
        future = submit(("chat-stream", uuid.uuid4().hex),
                        (payload, chat.settings, lambda text: loop.call_soon_threadsafe(events.put_nowait, text),
                         abandoned))
        future.add_done_callback(events.put_nowait)
        usage_field = {"usage": None} if chat.include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            body = {**reply.head("chat.completion.chunk"), **usage_field,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> AsyncIterator[str]:
            deadline = loop.time() + limits.request_timeout_s
            sent = ""
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        item = await asyncio.wait_for(events.get(), deadline - loop.time())
                    except TimeoutError:
                        yield error_event(504, f"no answer within {limits.request_timeout_s:g} s (request_timeout)")
                        return
                    if isinstance(item, str):
                        shown = settled_text(item, chat.settings.stop)
                        if len(shown) > len(sent) and shown.startswith(sent):
                            yield chunk({"content": shown[len(sent):]})
                            sent = shown
                        continue
                    if item.cancelled() or item.exception() is not None:
                        error = item.exception()
                        yield error_event(400, str(error)) if isinstance(error, ValueError) else \
                            error_event(500, "the server failed on this request (see its log)")
                        return
                    completion: Completion = item.result()[0]
                    if len(completion.text) > len(sent) and completion.text.startswith(sent):
                        yield chunk({"content": completion.text[len(sent):]})
                    yield chunk({}, completion.finish_reason)
                    if chat.include_usage:
                        body = {**reply.head("chat.completion.chunk"), "choices": [],
                                "usage": reply.usage([completion])}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                abandoned.set()
                future.cancel()  # still queued: dropped unrun; running: stops at its next token

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def error_event(status: int, message: str) -> str:
    """An error inside a stream, as OpenAI sends it (its client raises ``APIError``), then the end."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


def settled_text(text: str, stops: tuple[str, ...]) -> str:
    """What of the text so far can be sent: cut before a stop string, and short of an end that
    may be the start of one (or a character still being decoded, U+FFFD), trailing spaces left
    for later (the final text has none)."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    if cuts:
        text = text[:min(cuts)]
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    text = text[:len(text) - held]
    return text.rstrip().rstrip("\ufffd").rstrip()


class Reply:
    """The parts of an answer that every completion and chunk of one request share."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model, self.prompt_tokens = model, prompt_tokens

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def usage(self, completions: list[Completion]) -> dict[str, int]:
        """The queries and the prompt's tokens; every choice's tokens, the one that ended it included."""
        generated = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}

    def completion(self, completions: list[Completion]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None if c.logprobs is None else {"content": [
                        {**_token(chosen), "top_logprobs": [_token(t) for t in top]} for chosen, top in c.logprobs]},
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
        return {**self.head("chat.completion"), "choices": choices, "usage": self.usage(completions)}


def _token(token: Any) -> dict[str, Any]:
    return {"token": token.token, "logprob": token.logprob, "bytes": token.bytes}
