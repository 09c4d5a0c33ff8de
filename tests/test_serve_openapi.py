"""``/openapi.json`` of ``qformer serve`` describes what the server answers: schemathesis (the
test extra) generates requests from each server's description and checks every answer against
it (no 5xx, a documented status, a documented media type, a body of the documented schema), on a
stage-2 and a stage-1 server on loopback with tiny models and small limits, so that a run stays
short. Streams (text/event-stream) and gallery images are checked against their media types too."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qformer import load_tokenizer
from qformer.serve.app import create_app
from qformer.serve.gallery import Gallery
from qformer.serve.limits import Limits
from qformer.serve.service import ServedModel
from serve_helpers import gallery_folder, png_bytes, running
from stage1_helpers import usable_stage1

# Generation kept cheap (2 new tokens, 2 beams at most) and images small: every generated request
# that gets through its checks reaches the tiny model.
LIMITS = Limits(max_upload_bytes=100_000, max_image_pixels=10_000, max_prompt_chars=40, max_new_tokens=2,
                max_num_beams=2, max_texts=3, max_top=3, max_wait_ms=5)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# 40 examples per operation, derandomized (a seed fixed by the test's name) so that each run sends
# the same requests; no shrinking, so that a failure costs no more time than a pass (the failing
# request is in the report as it was sent); a slow model call or a filtered case is no reason to fail.
FUZZING = settings(max_examples=40, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                   suppress_health_check=list(HealthCheck))
OPERATIONS = {
    "stage2": [("/caption", "POST"), ("/vqa", "POST")],
    "stage1": [("/caption", "POST"), ("/match", "POST"), ("/search", "POST"), ("/gallery/{name}", "GET")],
}
EVERY_SERVER = [("/info", "GET"), ("/healthz", "GET"), ("/metrics", "GET"), ("/", "GET")]


@pytest.fixture(scope="module")
def servers(blip2, minilm_path, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Each kind of server's base URL."""
    stage1_model = usable_stage1(load_tokenizer(minilm_path))
    gallery = Gallery(stage1_model, gallery_folder(tmp_path_factory.mktemp("gallery") / "photos"), fingerprint="t")
    with running(create_app(ServedModel(blip2, "tiny-blip2"), LIMITS)) as stage2, \
            running(create_app(ServedModel(stage1_model, "tiny-stage1", gallery), LIMITS)) as stage1:
        yield {"stage1": stage1, "stage2": stage2}


def with_a_real_image(case: Case) -> Case:
    """``case`` with its image replaced by a picture the model reads (a generated one is noise
    bytes, refused with a 400 before the model runs), in the form its media type sends."""
    if isinstance(case.body, dict) and "image" in case.body:
        data = png_bytes(size=(40, 30))
        case.body["image"] = data if case.media_type == "multipart/form-data" else base64.b64encode(data).decode()
    return case


def test_each_server_describes_only_the_routes_it_serves(servers):
    for kind, url in servers.items():
        spec = httpx.get(f"{url}/openapi.json").json()
        described = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
        assert described == {*OPERATIONS[kind], *EVERY_SERVER}, kind
        for path, item in spec["paths"].items():
            for operation in item.values():
                assert {"408", "500", "503"} <= set(operation["responses"]), path
                assert "Retry-After" in operation["responses"]["503"]["headers"], path
    other = httpx.post(f"{servers['stage2']}/match", json={})
    assert other.status_code == 404 and other.json() == {"error": "this stage-2 model answers /caption, /vqa, "
                                                                  "not /match"}
    other = httpx.post(f"{servers['stage1']}/vqa", json={})
    assert other.status_code == 404 and other.json() == {"error": "this stage-1 model answers /caption, /match, "
                                                                  "/search, not /vqa"}
    assert httpx.get(f"{servers['stage2']}/gallery/0.png").json()["error"].endswith("not /gallery")
    spec = httpx.get(f"{servers['stage2']}/openapi.json").json()
    caption = spec["paths"]["/caption"]["post"]["responses"]
    assert set(caption) == {"200", "400", "408", "413", "415", "422", "500", "503", "504"}
    assert set(caption["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


@pytest.mark.parametrize(("kind", "path", "method"), [(kind, *op) for kind, ops in OPERATIONS.items()
                                                      for op in ops + EVERY_SERVER])
def test_every_answer_is_described(servers, kind, path, method):
    """Schemathesis's requests, half of them with a picture the model reads, each answered as
    the description says. A POST also gets bodies that break the description (negative mode:
    not JSON, fields of the wrong type or out of bounds), which must be refused, never a 5xx; the
    GET routes have no input to break."""
    operation = schemathesis.openapi.from_url(f"{servers[kind]}/openapi.json")[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE)
    if method == "POST":
        cases |= operation.as_strategy(GenerationMode.NEGATIVE)

    statuses: set[int] = set()

    @FUZZING
    @given(case=cases, real=st.booleans())
    def answered_as_described(case: Case, real: bool) -> None:
        response = (with_a_real_image(case) if real else case).call_and_validate(checks=CHECKS, timeout=60)
        statuses.add(response.status_code)

    answered_as_described()
    # Some requests reached the model and were answered (a random name is no gallery image's).
    assert 200 in statuses or path == "/gallery/{name}", statuses


def sent(operation: Any, body: dict[str, Any], media_type: str = "multipart/form-data") -> httpx.Response:
    """``body`` sent to ``operation`` and its answer checked against the description."""
    return operation.Case(body=body, media_type=media_type).call_and_validate(checks=CHECKS, timeout=60)


def test_streams_and_gallery_images_are_sent_as_described(servers):
    stage2 = schemathesis.openapi.from_url(f"{servers['stage2']}/openapi.json")
    for path, field in (("/caption", "prompt"), ("/vqa", "question")):
        answer = sent(stage2[path]["POST"], {"image": png_bytes(2), "stream": True, field: "what is it?"})
        assert answer.status_code == 200 and answer.headers["content-type"][0].startswith("text/event-stream")
        assert "event: done" in answer.text
    stage1 = schemathesis.openapi.from_url(f"{servers['stage1']}/openapi.json")
    found = sent(stage1["/search"]["POST"], {"text": "a red square", "top": 2}, "application/json")
    assert found.status_code == 200 and len(found.json()["results"]) == 2
    name = found.json()["results"][0]["image"]
    image = stage1["/gallery/{name}"]["GET"].Case(path_parameters={"name": name}).call_and_validate(checks=CHECKS)
    assert image.status_code == 200 and image.headers["content-type"][0] == "image/png"
    texts = sent(stage1["/search"]["POST"], {"image": png_bytes(), "top": 3})
    assert texts.status_code == 200 and {"text", "score", "itc"} == set(texts.json()["results"][0])
