"""``qformer serve`` through an HTTP client against servers on loopback with tiny models: every
route, every limit, bad input, batching, a full queue, timeouts, streaming, shutdown."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from qformer import load_tokenizer
from qformer.pretrained.stage1 import itc_scores, itm_scores
from qformer.pretrained.stage2 import CAPTION_DEFAULTS, VQA_DEFAULTS, Blip2
from qformer.retrieval import search
from qformer.serve.app import create_app
from qformer.serve.gallery import Gallery
from qformer.serve.limits import Limits
from qformer.serve.service import VQA_PROMPT, Generation, ServedModel
from serve_helpers import GatedModel, burst, gallery_folder, metric, png_bytes, running, serve_process, wait_for_queue
from stage1_helpers import usable_stage1

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_upload_bytes=200_000, max_image_pixels=100_000, max_prompt_chars=50, max_new_tokens=8,
                max_num_beams=3, max_texts=4, max_top=5, max_wait_ms=50)


def image_file(data: bytes | None = None, name: str = "a.png") -> dict:
    return {"image": (name, png_bytes() if data is None else data, "image/png")}


def picture(data: bytes | None = None) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes() if data is None else data)).convert("RGB")


@pytest.fixture(scope="module")
def stage2(blip2):
    with running(create_app(ServedModel(blip2, "tiny-blip2"), LIMITS)) as url, httpx.Client(base_url=url,
                                                                                                timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stage1_model(minilm_path):
    return usable_stage1(load_tokenizer(minilm_path))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, stage1_model) -> Gallery:
    folder = gallery_folder(tmp_path_factory.mktemp("gallery") / "photos")
    return Gallery(stage1_model, folder, fingerprint="tiny-stage1")


@pytest.fixture(scope="module")
def stage1(stage1_model, gallery):
    with running(create_app(ServedModel(stage1_model, "tiny-stage1", gallery), LIMITS)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


def assert_refused(response: httpx.Response, status: int, words: str) -> None:
    """A refusal: the status, one line naming the problem, no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"] and words in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in response.text


def test_health_info_openapi(stage2):
    assert stage2.get("/healthz").json() == {"status": "ok"}
    info = stage2.get("/info").json()
    assert info["kind"] == "stage2" and info["routes"] == ["caption", "vqa"] and info["gallery"] is None
    assert info["limits"]["max_new_tokens"] == 8 and info["limits"]["max_upload_bytes"] == 200_000
    spec = stage2.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/caption", "/vqa", "/info", "/healthz", "/metrics", "/"}  # stage-2's only
    body = spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert body["application/json"]["schema"]["properties"]["image"]["format"] == "byte"


def test_caption_and_vqa_answer_as_the_model_does(stage2, blip2):
    image = picture()
    expected = blip2.caption([image], max_new_tokens=8, num_beams=3)[0]
    got = stage2.post("/caption", files=image_file(), data={"max_new_tokens": "8"})
    assert got.status_code == 200 and got.json()["caption"] == expected, got.text
    as_json = stage2.post("/caption", json={"image": base64.b64encode(png_bytes()).decode(), "max_new_tokens": 8})
    assert as_json.json()["caption"] == expected
    prompted = stage2.post("/caption", files=image_file(), data={"prompt": "a photo of", "num_beams": "2",
                                                                "max_new_tokens": "5"}).json()
    settings = {**CAPTION_DEFAULTS, "num_beams": 2, "max_new_tokens": 5}
    assert prompted["caption"] == blip2.generate_text([image], ["a photo of"], **settings)[0]
    answer = stage2.post("/vqa", files=image_file(), data={"question": "what is it?"}).json()
    prompt = VQA_PROMPT.format("what is it?")
    settings = {**VQA_DEFAULTS, "max_new_tokens": 8, "num_beams": 3}  # BLIP-2's 10 tokens and 5 beams, within the limits
    assert answer["answer"] == blip2.generate_text([image], [prompt], **settings)[0]


def test_stream_sends_the_text_as_it_grows_then_the_greedy_caption(stage2, blip2):
    seed = 2  # a picture whose greedy caption by the tiny model is not empty within 6 tokens
    with stage2.stream("POST", "/caption", files=image_file(png_bytes(seed)), data={"stream": "true",
                                                                                  "max_new_tokens": "6"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [block for block in r.read().decode().split("\n\n") if block.strip()]
    texts = [json.loads(block.removeprefix("data: "))["text"] for block in events[:-1]]
    kind, data = events[-1].split("\n")
    assert kind == "event: done"
    final = json.loads(data.removeprefix("data: "))["caption"]
    greedy = blip2.caption([picture(png_bytes(seed))], num_beams=1, max_new_tokens=6)[0]
    assert final == greedy and texts and texts[-1] == final
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert_refused(stage2.post("/caption", files=image_file(), data={"stream": "true", "num_beams": "3"}), 422,
                   "streaming decodes one beam")


def test_bad_input_answers_4xx_in_words(stage2):
    png = png_bytes()
    cases = [
        (stage2.post("/caption", files=image_file(b"this is not an image")), 400, "not an image file"),
        (stage2.post("/caption", files=image_file(png[: len(png) // 2])), 400, "cannot read image"),
        (stage2.post("/caption", files=image_file(b"")), 400, "empty"),
        (stage2.post("/caption", data={"prompt": "hi"}), 422, "image: missing"),
        (stage2.post("/caption", json={"image": 5}), 422, "expected a file or a base64 string"),
        (stage2.post("/caption", json={"image": "@@@not base64@@@"}), 400, "not valid base64"),
        (stage2.post("/caption", content=b"{not json", headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        (stage2.post("/caption", json=["a list"]), 400, "object of fields"),
        (stage2.post("/caption", content=b"raw", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
        (stage2.post("/caption", files=image_file(), data={"max_new_tokens": "9"}), 422, "outside 1..8"),
        (stage2.post("/caption", files=image_file(), data={"max_new_tokens": "many"}), 422, "expected an integer"),
        (stage2.post("/caption", json={"image": base64.b64encode(png).decode(), "num_beams": 1.5}), 422,
         "expected an integer"),
        (stage2.post("/caption", files=image_file(), data={"num_beams": "0"}), 422, "outside 1..3"),
        (stage2.post("/caption", files=image_file(), data={"stream": "perhaps"}), 422, "true or false"),
        (stage2.post("/caption", files=image_file(), data={"prompt": "x" * 51}), 422, "max_prompt_chars"),
        (stage2.post("/vqa", files=image_file()), 422, "question: missing"),
        (stage2.post("/vqa", json={"image": base64.b64encode(png).decode(), "question": ["a"]}), 422,
         "expected a string"),
        (stage2.post("/match", json={}), 404, "answers /caption, /vqa"),
        (stage2.get("/nowhere"), 404, "Not Found"),
        (stage2.get("/caption"), 405, "Method Not Allowed"),
    ]
    for response, status, words in cases:
        assert_refused(response, status, words)
    assert stage2.post("/caption", files=image_file()).status_code == 200  # the server still answers


def test_upload_and_pixel_limits(stage2):
    big = b"\0" * 300_000
    assert_refused(stage2.post("/caption", files=image_file(big)), 413, "max_upload_bytes")

    def chunks():  # no Content-Length: the body is counted as it comes
        for _ in range(30):
            yield b"\0" * 10_000

    chunked = stage2.post("/caption", content=chunks(), headers={"content-type": "application/json"})
    assert_refused(chunked, 413, "max_upload_bytes")
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), "red").save(buffer, format="PNG")  # 120,000 pixels, over the 100,000 limit
    wide = buffer.getvalue()
    assert_refused(stage2.post("/caption", files=image_file(wide)), 400, "max_image_pixels")
    bomb = bytearray(png_bytes(size=(4, 4)))
    bomb[16:24] = (60_000).to_bytes(4, "big") + (60_000).to_bytes(4, "big")  # the header claims 3.6 billion pixels
    assert_refused(stage2.post("/caption", files=image_file(bytes(bomb))), 400, "cannot read image")


def test_requests_that_arrive_together_share_a_batch_and_answer_as_alone(blip2):
    """While the model answers one request, the seven that arrive wait together and then share
    one model call; every caption is the one its image gets alone."""
    limits = Limits(max_batch=8, max_wait_ms=300, max_new_tokens=8)
    images = [png_bytes(seed) for seed in range(8)]
    alone = [blip2.caption([picture(data)], max_new_tokens=4)[0] for data in images]
    model = GatedModel(blip2)
    with running(create_app(model, limits)) as url, httpx.Client(base_url=url, timeout=300) as c, \
            ThreadPoolExecutor(8) as pool:
        def ask(data: bytes) -> str:
            response = c.post("/caption", files=image_file(data), data={"max_new_tokens": "4"})
            assert response.status_code == 200, response.text
            return response.json()["caption"]

        try:
            answers = [pool.submit(ask, images[0])]
            assert model.entered.wait(300)
            answers += [pool.submit(ask, data) for data in images[1:]]
            wait_for_queue(url, 7)
        finally:
            model.release.set()
        answers = [answer.result() for answer in answers]
        metrics = c.get("/metrics").text
    assert answers == alone
    assert metric(metrics, 'qformer_batch_size_count{route="caption"}') == 2, metrics  # the first, then the seven
    assert metric(metrics, 'qformer_batch_size_sum{route="caption"}') == 8
    assert metric(metrics, 'qformer_requests_total{route="caption",status="200"}') == 8
    assert "qformer_queue_length 0.0" in metrics and 'qformer_request_seconds_count{route="caption"} 8.0' in metrics


def test_200_concurrent_captions_are_all_answered_in_batches(blip2):
    """The bounded load test (its speed is bench/bench_serve.py's): 200 requests at once. The
    first batch holds the model until all the others are queued, which then go in full batches
    of 16 (the last one less)."""
    images = [png_bytes(seed) for seed in range(200)]
    limits = Limits(max_batch=16, max_wait_ms=10, max_queue=256)
    model = GatedModel(blip2)
    with running(create_app(model, limits)) as url:
        answers: list[list[str]] = []
        client = threading.Thread(target=lambda: answers.append(asyncio.run(burst(url, images, new_tokens=3))))
        client.start()
        try:
            assert model.entered.wait(300)
            first = model.sizes[0]  # those that came within max_wait_ms of the first
            wait_for_queue(url, 200 - first)
        finally:
            model.release.set()
        client.join(300)
        metrics = httpx.get(f"{url}/metrics").text
    assert len(answers[0]) == 200 and all(isinstance(answer, str) for answer in answers[0])
    assert metric(metrics, 'qformer_requests_total{route="caption",status="200"}') == 200
    assert metric(metrics, 'qformer_batch_size_sum{route="caption"}') == 200
    assert model.sizes == [first] + [16] * ((200 - first) // 16) + ([(200 - first) % 16] if (200 - first) % 16 else [])
    assert metric(metrics, 'qformer_batch_size_count{route="caption"}') == len(model.sizes)


class SlowModel(ServedModel):
    """The tiny model behind a model call that takes ``seconds`` (queue and timeout tests)."""

    def __init__(self, model: Blip2, seconds: float) -> None:
        super().__init__(model, "slow")
        self.seconds = seconds

    def run_batch(self, key, payloads):
        time.sleep(self.seconds)
        return super().run_batch(key, payloads)


def test_a_full_queue_answers_503_with_retry_after_never_a_hang(blip2):
    """One request on the model, two queued (max_queue 2): every further one is refused at once
    with a 503 and Retry-After, the three accepted are answered, and the server recovers."""
    limits = Limits(max_batch=1, max_queue=2, max_wait_ms=1, max_new_tokens=8)
    model = GatedModel(blip2)
    with running(create_app(model, limits)) as url, httpx.Client(base_url=url, timeout=300) as c, \
            ThreadPoolExecutor(3) as pool:
        def caption() -> httpx.Response:
            return c.post("/caption", files=image_file(), data={"max_new_tokens": "2"})

        try:
            accepted = [pool.submit(caption)]
            assert model.entered.wait(300)
            accepted += [pool.submit(caption) for _ in range(2)]
            wait_for_queue(url, 2)
            for _ in range(5):
                assert_refused(busy := caption(), 503, "the server is busy")
                assert busy.headers["retry-after"] == "1"
        finally:
            model.release.set()
        assert [future.result().status_code for future in accepted] == [200] * 3
        assert caption().status_code == 200  # recovers


def test_a_request_past_its_timeout_answers_504(blip2):
    limits = Limits(request_timeout_s=0.2, max_wait_ms=1)
    with running(create_app(SlowModel(blip2, 1.0), limits)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert_refused(c.post("/caption", files=image_file()), 504, "no answer within 0.2 s")
        streamed = c.post("/caption", files=image_file(), data={"stream": "true"})
        assert streamed.status_code == 200 and streamed.text.startswith("event: error\n")
        assert "no answer within 0.2 s" in streamed.text and "Traceback" not in streamed.text
        assert c.get("/healthz").status_code == 200


def test_stage1_match_equals_the_library(stage1, stage1_model):
    texts = ["a red square", "two cats"]
    got = stage1.post("/match", files=[("image", ("a.png", png_bytes(), "image/png"))] +
                      [("texts", (None, t)) for t in texts])
    assert got.status_code == 200, got.text
    body = got.json()
    image = picture()
    expected_itm = itm_scores(stage1_model, [image, image], texts)
    expected_itc = itc_scores(stage1_model, [image], texts)[0]
    torch.testing.assert_close(torch.tensor(body["itm"]), expected_itm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(body["itc"]), expected_itc, rtol=1e-5, atol=1e-5)
    as_json = stage1.post("/match", json={"image": base64.b64encode(png_bytes()).decode(), "texts": texts[0]}).json()
    assert as_json["texts"] == texts[:1] and abs(as_json["itm"][0] - body["itm"][0]) < 1e-5
    assert_refused(stage1.post("/match", json={"image": base64.b64encode(png_bytes()).decode(), "texts": []}), 422,
                   "texts: one or more")
    assert_refused(stage1.post("/match", json={"image": base64.b64encode(png_bytes()).decode(),
                                               "texts": ["t"] * 5}), 422, "max_texts")
    assert_refused(stage1.post("/vqa", files=image_file()), 404, "answers /caption, /match, /search, not /vqa")


def test_stage1_search_ranks_as_the_library_and_serves_the_images(stage1, stage1_model, gallery):
    info = stage1.get("/info").json()
    assert info["kind"] == "stage1" and info["gallery"] == {"images": 5, "texts": 3}
    body = stage1.post("/search", json={"text": "a red square", "top": 3}).json()
    expected = search(stage1_model, gallery.folder, "a red square", top=3, k=16)
    assert [hit["image"] for hit in body["results"]] == [Path(name).name for name, _ in expected.matches[0]]
    for hit, (_, score) in zip(body["results"], expected.matches[0]):
        assert abs(hit["score"] - score) < 1e-4
    served = stage1.get(body["results"][0]["url"])
    assert served.status_code == 200 and served.content == (gallery.folder / body["results"][0]["image"]).read_bytes()
    texts = stage1.post("/search", files=image_file(), data={"top": "2"}).json()["results"]
    assert len(texts) == 2 and {hit["text"] for hit in texts} <= set(gallery.texts)
    assert texts[0]["score"] >= texts[1]["score"]
    assert_refused(stage1.post("/search", json={}), 422, "pass text")
    assert_refused(stage1.post("/search", json={"text": "x", "top": 6}), 422, "outside 1..5")
    for name in ("broken.png", "texts.txt", "%2E%2E"):
        assert_refused(stage1.get(f"/gallery/{name}"), 404, "no gallery image")
    assert_refused(stage1.get("/gallery/..%2F..%2Fetc%2Fpasswd"), 404, "Not Found")


def test_gallery_index_is_kept_on_disk_and_updated_incrementally(tmp_path, stage1_model, caplog):
    folder = gallery_folder(tmp_path / "photos", images=3)
    first = Gallery(stage1_model, folder, fingerprint="model-a")
    assert first.refresh() == {"added": 3, "removed": 0, "unreadable": 1, "images": 3, "texts": 3}
    index = folder / ".qformer-index"
    assert {p.name for p in index.iterdir()} == {"manifest.json", "features.safetensors"}
    again = Gallery(stage1_model, folder, fingerprint="model-a")  # a restart: nothing encoded again
    assert again.refresh() == {"added": 0, "removed": 0, "unreadable": 1, "images": 3, "texts": 3}
    torch.testing.assert_close(again.image_features, first.image_features)
    (folder / "3.png").write_bytes(png_bytes(3))
    (folder / "0.png").unlink()
    assert again.refresh() == {"added": 1, "removed": 1, "unreadable": 1, "images": 3, "texts": 3}
    fresh = Gallery(stage1_model, folder, fingerprint="model-a", index=tmp_path / "elsewhere")
    fresh.refresh()
    order = [again.names.index(name) for name in fresh.names]
    torch.testing.assert_close(again.image_features[order], fresh.image_features)  # incremental = from scratch
    other = Gallery(stage1_model, folder, fingerprint="model-b")  # another model: rebuilt
    assert other.refresh()["added"] == 3


def test_cli_serves_and_finishes_in_flight_requests_on_sigterm(blip2_dir):
    with serve_process(["--model", str(blip2_dir), "--device", "cpu", "--max-wait-ms", "5000"]) as (url, server, output):
        result = {}
        request = threading.Thread(target=lambda: result.update(response=httpx.post(
            f"{url}/caption", files=image_file(), data={"max_new_tokens": "3"}, timeout=300)))
        request.start()
        wait_for_queue(url, 1)  # the request waits in its batch (max_wait_ms 5000) when the signal comes
        server.send_signal(signal.SIGTERM)
        request.join(60)
        assert result["response"].status_code == 200 and isinstance(result["response"].json()["caption"], str)
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        log = output.read_text()
    assert "Shutting down" in log and "Traceback" not in log, log


def test_cli_refuses_bad_settings_in_one_line(blip2_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    cases = [(["--model", str(blip2_dir), "--max-batch", "0"], "max_batch must be positive"),
             (["--model", str(blip2_dir), "--port", "70000"], "--port must be within 1..65535"),
             (["--model", str(tmp_path / "missing")], "not a local directory"),
             (["--model", str(tmp_path)], "holds no config.json: expected a model directory"),
             (["--model", str(blip2_dir), "--gallery", str(tmp_path)], "--gallery is searched by a stage-1 model")]
    for arguments, words in cases:
        done = subprocess.run([sys.executable, "-m", "qformer", "serve", *arguments], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1 and words in done.stderr, (arguments, done.stderr)
        assert "Traceback" not in done.stderr


def test_instructblip_answers_with_the_question_read_by_its_qformer(tmp_path):
    from stage2_helpers import tiny_tokenizer
    from test_instructblip import tiny_transformers_instructblip

    tiny_transformers_instructblip("t5").save_pretrained(tmp_path)
    tiny_tokenizer(add_bos=False).save_pretrained(tmp_path)
    tiny_tokenizer(add_bos=False).save_pretrained(tmp_path / "qformer_tokenizer")
    model = Blip2.from_pretrained(tmp_path)
    assert model.reads_instruction
    prompt = VQA_PROMPT.format("what is it?")
    expected = model.generate_text([picture()], [prompt], **{**VQA_DEFAULTS, "max_new_tokens": 8, "num_beams": 3})[0]
    with running(create_app(ServedModel(model, "tiny-instructblip"), LIMITS)) as url:
        answer = httpx.post(f"{url}/vqa", files=image_file(), data={"question": "what is it?"}, timeout=60)
    assert answer.status_code == 200 and answer.json()["answer"] == expected


def test_a_stream_whose_client_went_away_stops_generating(blip2):
    """The streamed generation stops at the next token once its client is gone."""
    served = ServedModel(blip2, "tiny")
    settings = served.generation_settings("caption", 30, 1, Limits())
    payload = Generation(picture(png_bytes(2)), "")
    gone = threading.Event()
    texts = []

    def emit(text: str) -> None:
        texts.append(text)
        gone.set()  # the client leaves after the first piece of text

    partial = served.stream(payload, settings, emit, gone)
    whole = served.stream(payload, settings, lambda text: None, threading.Event())
    assert len(texts) <= 2 and partial == texts[-1]  # the token in flight may still come
    assert len(partial.split()) < len(whole.split()) - 5


def test_malformed_bodies_answer_4xx_and_the_server_stays_up(stage2):
    import random

    rng = random.Random(0)
    bodies = [
        (b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc", "multipart/form-data; boundary=x"),
        (b"no boundary at all", "multipart/form-data"),
        (bytes(rng.randrange(256) for _ in range(2000)), "multipart/form-data; boundary=----abc"),
        (b"\xff\xfe{\"image\": 1}", "application/json"),
        (json.dumps({"image": {"nested": [1, 2]}}).encode(), "application/json"),
        (b"image=%ZZ&prompt=" + b"a" * 10, "application/x-www-form-urlencoded"),
    ]
    for body, kind in bodies:
        response = stage2.post("/caption", content=body, headers={"content-type": kind})
        assert 400 <= response.status_code < 500, (kind, response.status_code, response.text)
        assert list(response.json()) == ["error"] and "Traceback" not in response.text
    many = [("texts", (None, "t")) for _ in range(100)] + [("image", ("a.png", png_bytes(), "image/png"))]
    assert 400 <= stage2.post("/caption", files=many).status_code < 500
    assert stage2.get("/healthz").status_code == 200


def test_a_search_checks_the_folder_not_every_file(tmp_path, stage1_model, monkeypatch):
    """An image added while serving is found at the next search; an unchanged folder is not scanned."""
    folder = gallery_folder(tmp_path / "photos", images=2)
    gallery = Gallery(stage1_model, folder, fingerprint="m")
    gallery.refresh()
    scans = []
    original = Gallery.signature
    monkeypatch.setattr(Gallery, "signature", lambda self: scans.append(1) or original(self))
    gallery.refresh_if_changed()
    assert scans == [] and len(gallery.names) == 2
    (folder / "new.png").write_bytes(png_bytes(7))
    gallery.refresh_if_changed()
    assert scans and "new.png" in gallery.names
