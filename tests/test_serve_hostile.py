"""``qformer serve`` against hostile clients (issue #26): each malformed input answers a 4xx in one
line, never a 500; one client's bad request never fails, or reaches, the requests batched with
it; a client that hangs up costs no model time and is counted apart (499)."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from qformer import load_tokenizer
from qformer.serve.app import create_app
from qformer.serve.limits import Limits
from qformer.serve.service import ServedModel
from serve_helpers import GatedModel, metric, png_bytes, running, serve_process, wait_for_queue
from stage1_helpers import usable_stage1

LIMITS = Limits(max_new_tokens=8, max_num_beams=2, max_wait_ms=20)
SURROGATE = '"a \\ud800 photo"'  # JSON's escape for a lone UTF-16 surrogate, as a hostile client sends it
PNG_BASE64 = base64.b64encode(png_bytes()).decode()


def picture(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(seed))).convert("RGB")


def raw_json(url: str, path: str, body: str) -> httpx.Response:
    """POST ``body`` as it is (json= would refuse to encode a lone surrogate)."""
    return httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=120)


def assert_refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"] and words in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in response.text


@pytest.fixture(scope="module")
def stage2_url(blip2):
    with running(create_app(ServedModel(blip2, "tiny-blip2"), LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def stage1_url(minilm_path, tmp_path_factory):
    from qformer.serve.gallery import Gallery
    from serve_helpers import gallery_folder

    model = usable_stage1(load_tokenizer(minilm_path))
    gallery = Gallery(model, gallery_folder(tmp_path_factory.mktemp("gallery") / "photos"), fingerprint="tiny")
    with running(create_app(ServedModel(model, "tiny-stage1", gallery), LIMITS)) as url:
        yield url


def test_every_malformed_input_of_the_report_is_a_4xx(stage2_url, stage1_url):
    image = f'"image": "{PNG_BASE64}"'
    cases = [
        (stage2_url, "/caption", '{"image": "data:image/png;base64"}', 400, "a data URL must be"),
        (stage2_url, "/caption", '{"image": "data:image/png,' + PNG_BASE64 + '"}', 400, "a data URL must be"),
        (stage2_url, "/caption", "[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
        (stage2_url, "/caption", '{"image": {"a": ' * 50_000 + "1" + "}" * 50_001, 400, "nested too deeply"),
        (stage2_url, "/caption", "{" + image + ', "max_new_tokens": ' + "9" * 5000 + "}", 400, "over 4,300 digits"),
        (stage2_url, "/caption", "{" + image + ', "max_new_tokens": ' + "9" * 4000 + "}", 422, "4000-digit number"),
        (stage2_url, "/caption", "{" + image + ', "prompt": ' + SURROGATE + "}", 422, "prompt: not valid Unicode"),
        (stage2_url, "/vqa", "{" + image + ', "question": ' + SURROGATE + "}", 422, "question: not valid Unicode"),
        (stage1_url, "/match", "{" + image + ', "texts": ["fine", ' + SURROGATE + "]}", 422,
         "texts[2]: not valid Unicode"),
        (stage1_url, "/search", '{"text": ' + SURROGATE + "}", 422, "text: not valid Unicode"),
        (stage2_url, "/caption", "{" + image + ', "prompt": "' + "a " * 60 + '"}', 400, "shorten the prompt"),
    ]
    for url, path, body, status, words in cases:
        assert_refused(raw_json(url, path, body), status, words)
    form = httpx.post(stage2_url + "/caption", files={"image": ("a.png", png_bytes(), "image/png")},
                      data={"max_new_tokens": "9" * 5000}, timeout=60)
    assert_refused(form, 422, "expected an integer, got 5,000 characters")
    for url in (stage2_url, stage1_url):
        metrics = httpx.get(url + "/metrics").text
        assert 'status="500"' not in metrics, metrics


class Batched(GatedModel):
    """The gated tiny model, whose batched call fails as a whole when a request's prompt holds
    ``POISON``: a fault that only the batch shows (the request alone is refused in its own
    words), as a tokenizer or a kernel can fail on one row of a batch."""

    POISON = "poison"

    def run_batch(self, key, payloads):
        if any(self.POISON in getattr(p, "prompt", "") for p in payloads):
            self.sizes.append(len(payloads))
            if len(payloads) > 1:
                raise RuntimeError("the batch failed somewhere")
            raise ValueError(f"this request's prompt holds {self.POISON}")
        return super().run_batch(key, payloads)


def test_a_bad_request_never_fails_the_requests_batched_with_it(blip2):
    """While one request holds the model, three normal captions and one attacker's wait together
    and share a batch, for each kind of attack: the normal ones answer 200 with the caption they
    get alone, the attacker alone gets an error, and its words reach nobody else."""
    model = Batched(blip2)
    limits = Limits(max_batch=8, max_wait_ms=200, max_new_tokens=8)
    settings = model.generation_settings("caption", 3, 1, limits)
    alone = [blip2.generate_text([picture(seed)], [""], **settings)[0] for seed in range(3)]
    normal = [f'{{"image": "{base64.b64encode(png_bytes(seed)).decode()}", "max_new_tokens": 3, "num_beams": 1}}'
              for seed in range(3)]
    attacks = [
        ('{"image": "%s", "max_new_tokens": 3, "num_beams": 1, "prompt": %s}' % (PNG_BASE64, SURROGATE), 422),
        ('{"image": "%s", "max_new_tokens": 3, "num_beams": 1, "prompt": "%s"}' % (PNG_BASE64, "a " * 60), 400),
        ('{"image": "%s", "max_new_tokens": 3, "num_beams": 1, "prompt": "%s"}' % (PNG_BASE64, Batched.POISON), 400),
    ]
    with running(create_app(model, limits)) as url, ThreadPoolExecutor(5) as pool:
        holder = pool.submit(raw_json, url, "/caption", normal[0])
        assert model.entered.wait(300)
        for attack, status in attacks:
            queued = [pool.submit(raw_json, url, "/caption", body) for body in normal]
            attacker = pool.submit(raw_json, url, "/caption", attack)
            wait_for_queue(url, 4 if status == 400 and Batched.POISON in attack else 3)
            model.release.set()
            answers = [future.result() for future in queued]
            assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
            assert [a.json()["caption"] for a in answers] == alone
            refused = attacker.result()
            assert refused.status_code == status, refused.text
            assert all(refused.json()["error"] not in a.text for a in answers)
            model.release.clear()
            model.entered.clear()
            pool.submit(raw_json, url, "/caption", normal[0])  # holds the model for the next attack
            assert model.entered.wait(300)
        model.release.set()
        assert holder.result().status_code == 200
    assert 4 in model.sizes and model.sizes.count(1) >= 1  # the poisoned batch of four, then one by one


def send_and_leave_open(url: str, body: bytes) -> socket.socket:
    """A caption request written on a raw socket, left open: closing it is the client hanging up."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port))
    sock.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_requests_whose_clients_hang_up_leave_the_queue_unrun_and_count_as_499(blip2):
    """With the model busy, 16 clients send a caption and hang up: none of them is computed, each
    is counted under status 499 (not 200), and the next client is answered as usual."""
    model = GatedModel(blip2)
    limits = Limits(max_batch=32, max_wait_ms=1, max_new_tokens=8)
    body = json.dumps({"image": PNG_BASE64, "max_new_tokens": 2, "num_beams": 1}).encode()
    with running(create_app(model, limits)) as url, ThreadPoolExecutor(1) as pool:
        holder = pool.submit(raw_json, url, "/caption", body.decode())
        assert model.entered.wait(300)
        sockets = [send_and_leave_open(url, body) for _ in range(16)]
        try:
            wait_for_queue(url, 16)
        finally:
            for sock in sockets:
                sock.close()
        deadline = time.monotonic() + 60
        while metric_or_zero(url, 'qformer_requests_total{route="caption",status="499"}') < 16:
            assert time.monotonic() < deadline, httpx.get(url + "/metrics").text
            time.sleep(0.05)
        model.release.set()
        assert holder.result().status_code == 200
        assert raw_json(url, "/caption", body.decode()).status_code == 200
        metrics = httpx.get(url + "/metrics").text
    assert model.sizes == [1, 1], model.sizes  # the holder, then the last client: the 16 never ran
    assert metric(metrics, 'qformer_requests_total{route="caption",status="200"}') == 2
    assert metric(metrics, 'qformer_requests_total{route="caption",status="499"}') == 16
    assert "qformer_queue_length 0.0" in metrics


def metric_or_zero(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return metric(text, name) if any(line.startswith(name + " ") for line in text.splitlines()) else 0.0


def test_a_client_leaving_during_its_batch_lets_the_batch_finish(blip2):
    """A client that hangs up while its request is on the model: the batch runs to its end and
    the others in it are answered."""
    model = GatedModel(blip2)
    limits = Limits(max_batch=8, max_wait_ms=300, max_new_tokens=8)
    body = json.dumps({"image": PNG_BASE64, "max_new_tokens": 2, "num_beams": 1}).encode()
    with running(create_app(model, limits)) as url, ThreadPoolExecutor(2) as pool:
        leaving = send_and_leave_open(url, body)
        assert model.entered.wait(300)
        stays = pool.submit(raw_json, url, "/caption", body.decode())
        wait_for_queue(url, 1)
        leaving.close()
        deadline = time.monotonic() + 60
        while metric_or_zero(url, 'qformer_requests_total{route="caption",status="499"}') < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        model.release.set()
        assert stays.result().status_code == 200
    assert model.sizes == [1, 1]  # the batch of the client that left ran to its end, then the other


def wide_grey_png(side: int) -> bytes:
    """A ``side`` x ``side`` 16-bit grey gradient as PNG: a few kB that decode to 2 bytes a pixel."""
    values = (np.arange(side, dtype=np.uint32) * 65535 // max(side - 1, 1)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(values, (side, 1))).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


# What the hostile cases may leave in the server. Measured on a 2-core EPYC: 4 MiB; 210-260 MiB
# before the decoder handed large images' memory back (serve/requests.py, _return_freed_memory).
RSS_BOUND = 64 * 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_the_hostile_cases_leave_the_servers_memory_within_a_bound(blip2_dir):
    """``qformer serve`` in its own process: the report's hostile cases (malformed bodies, lone
    surrogates, deep JSON, three 6000x6000 16-bit PNGs at once, 32 clients that hang up) all
    answer 4xx or 200, never 500, and the server's RSS after them is within RSS_BOUND of before
    (measured after the same normal captions, so lazy start-up costs are in both)."""
    body = json.dumps({"image": PNG_BASE64, "max_new_tokens": 2, "num_beams": 1})
    wide = base64.b64encode(wide_grey_png(6000)).decode()
    with serve_process(["--model", str(blip2_dir), "--max-new-tokens", "4"]) as (url, process, _):
        for _ in range(3):
            assert raw_json(url, "/caption", body).status_code == 200
        before = rss_bytes(process.pid)
        hostile = [
            '{"image": "data:image/png;base64"}', "[" * 100_000 + "]" * 100_000,
            '{"image": "%s", "max_new_tokens": %s}' % (PNG_BASE64, "9" * 5000),
            '{"image": "%s", "prompt": %s}' % (PNG_BASE64, SURROGATE),
            '{"image": "%s", "prompt": "%s"}' % (PNG_BASE64, "a " * 900),
        ]
        statuses = [raw_json(url, "/caption", case).status_code for case in hostile * 4]
        with ThreadPoolExecutor(3) as pool:
            statuses += [r.status_code for r in pool.map(
                lambda _: raw_json(url, "/caption", json.dumps({"image": wide, "max_new_tokens": 2, "num_beams": 1})),
                range(3))]
        sockets = [send_and_leave_open(url, body.encode()) for _ in range(32)]
        for sock in sockets:
            sock.close()
        for _ in range(3):
            assert raw_json(url, "/caption", body).status_code == 200
        after = rss_bytes(process.pid)
        metrics = httpx.get(url + "/metrics").text
    assert all(400 <= status < 500 for status in statuses[:-3]) and statuses[-3:] == [200] * 3, statuses
    assert 'status="500"' not in metrics
    assert after - before <= RSS_BOUND, f"RSS grew by {(after - before) / 2**20:.0f} MiB"
    print(f"server RSS: {before / 2**20:.0f} MiB before the hostile cases, {after / 2**20:.0f} MiB after")


@pytest.mark.parametrize("route", ["caption", "v1"])
def test_a_stream_left_half_read_counts_as_499_and_stops_generating(blip2, route):
    """A client that reads the start of a stream and hangs up: counted under 499, not 200 (no
    client read the answer), for the native stream and OpenAI's alike; the generation it asked
    for stops at its next token (the model is free for the next request)."""
    model = GatedModel(blip2)
    if route == "caption":
        path, body = "/caption", {"image": PNG_BASE64, "max_new_tokens": 8, "stream": True}
    else:
        path, body = "/v1/chat/completions", {"model": "gated", "max_tokens": 8, "stream": True, "messages": [
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64," + PNG_BASE64}}]}]}
    with running(create_app(model, Limits(max_new_tokens=8))) as url:
        with httpx.stream("POST", url + path, json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: the iterator, once collected, closes the response
            if route == "v1":  # OpenAI's stream names the role before the model runs
                assert '"role": "assistant"' in next(lines)
            assert model.entered.wait(300)
        model.release.set()  # the client has gone: the generation stops at its next token
        label = f'qformer_requests_total{{route="{route}",status="499"}}'
        deadline = time.monotonic() + 60
        while metric_or_zero(url, label) < 1:
            assert time.monotonic() < deadline, httpx.get(url + "/metrics").text
            time.sleep(0.05)
        metrics = httpx.get(url + "/metrics").text
        assert f'route="{route}",status="200"' not in metrics
        assert raw_json(url, "/caption", json.dumps({"image": PNG_BASE64, "max_new_tokens": 2,
                                                     "num_beams": 1})).status_code == 200
