"""What ``qformer serve`` answers, as pydantic models, and the responses each route documents in
``/openapi.json``: a client (or a schema-driven fuzzer) reads from the description every status a
route can send, the body's schema and its media type, and the description stays true because the
routes' answers are validated against the same models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from qformer.serve.limits import Limits


class Answer(BaseModel):
    """A model's answer; ``extra="forbid"`` so that a key the description lacks fails loudly
    (a 500 in the tests) instead of going out undocumented."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(Answer):
    """Every refusal and failure: one line that names the problem (never a traceback)."""

    error: str


class Caption(Answer):
    caption: str
    seconds: float


class VqaAnswer(Answer):
    answer: str
    seconds: float


class StreamText(Answer):
    """A streamed event: the text generated so far (each one extends the one before)."""

    text: str


class MatchScores(Answer):
    """The image against each text, in the order sent: ITM probability and ITC similarity."""

    texts: list[str]
    itm: list[float]
    itc: list[float]


class ImageHit(Answer):
    """A gallery image found by a text; ``url`` serves it (``/gallery/{name}``)."""

    image: str
    url: str
    score: float
    itc: float


class TextHit(Answer):
    """A gallery text (a line of texts.txt) found by an image."""

    text: str
    score: float
    itc: float


class ImagesFound(Answer):
    results: list[ImageHit]


class TextsFound(Answer):
    results: list[TextHit]


class GallerySize(Answer):
    images: int
    texts: int


class PublicLimits(Answer):
    """:meth:`Limits.public`: what one request may ask."""

    max_upload_bytes: int
    max_image_pixels: int
    max_prompt_chars: int
    max_new_tokens: int
    max_num_beams: int
    max_choices: int
    max_texts: int
    max_top: int


class Info(Answer):
    model: str
    kind: Literal["stage1", "stage2"]
    routes: list[str]
    gallery: GallerySize | None
    limits: PublicLimits
    version: str


class Health(Answer):
    status: Literal["ok"]


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}

# Each status a route may send, and why. 499 (the client went away) is only logged: no client reads it.
WHY = {
    400: "The input cannot be read: not JSON or a form, an image that cannot be decoded, not base64, "
         "or input the model refuses (a search on a server with no gallery)",
    404: "No such gallery image",
    408: "The request's headers or body did not arrive in time",
    413: "The request body is over max_upload_bytes",
    415: "The body is neither multipart/form-data nor application/json",
    422: "A field is missing, of the wrong type, or outside the server's limits",
    500: "The server failed on this request (the traceback is in its log, never in the answer)",
    503: "The server is busy (its queue or its connections are full): retry after Retry-After seconds",
    504: "No answer within request_timeout",
}
EVERY_ROUTE = (408, 500, 503)  # the connection caps, the header timeout and a failure reach any route
POSTED = (400, 413, 415, 422, 504, *EVERY_ROUTE)


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI's ``responses`` for ``statuses``: each one's reason and the error body. The body
    is given as JSON content, not as a ``model``: FastAPI would file a model under the route's
    own media type, which for /metrics and / is text."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"description": WHY[status],
                       "content": {"application/json": {"schema": ErrorBody.model_json_schema()}}}
        if status == 503:
            out[status]["headers"] = RETRY_AFTER
    return out


def json_event(name: str, data: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event whose data is a JSON document of ``data``'s schema."""
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": name},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data.model_json_schema()},
    }}


def or_events(final: type[BaseModel]) -> dict[str, Any]:
    """The 200 of a generation route: ``final`` as JSON, or with ``stream`` true, server-sent
    events (schema: each event, as Open API 3.1 reads a stream): the text so far as unnamed
    events, then ``done`` with ``final`` or ``error``."""
    events = {"oneOf": [json_event("message", StreamText), json_event("done", final), json_event("error", ErrorBody)]}
    return {200: {"description": f"The answer ({final.__name__}), or with stream true its events",
                  "content": {"text/event-stream": {"schema": events}}}}


IMAGE = {200: {"description": "The image file, as stored in the gallery",
               "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}}


def body_schema(fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """The request body of a POST route, in both forms it takes: ``image`` is a file in a form
    and base64 (or a data URL) in JSON."""
    # an image is never empty: the least a schema can say of "bytes that decode as an image"
    multipart = {k: ({"type": "string", "format": "binary", "minLength": 1} if k == "image" else v)
                 for k, v in fields.items()}
    as_json = {k: ({"type": "string", "format": "byte", "minLength": 1} if k == "image" else v)
               for k, v in fields.items()}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": multipart, "required": required}},
        "application/json": {"schema": {"type": "object", "properties": as_json, "required": required}},
    }}}


def request_fields(limits: Limits) -> dict[str, dict[str, Any]]:
    """Each field a POST route reads, with the bounds ``limits`` puts on it (the same ones the
    route checks), so that the description says what a request may ask."""
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars}
    return {
        "image": {},
        "prompt": text,
        "question": text,
        "text": text,
        "texts": {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_texts},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": limits.max_num_beams},
        "top": {"type": "integer", "minimum": 1, "maximum": limits.max_top},
        "stream": {"type": "boolean"},
    }
