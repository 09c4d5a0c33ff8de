"""``qformer serve``'s connection limits against raw sockets and an HTTP client on loopback:
clients too slow with their headers or their body answered 408 and cut off, connections over
the cap answered 503 with Retry-After, and 200 requests at once answered 200 or 503, never 500."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from qformer.serve.app import create_app
from qformer.serve.limits import Limits
from qformer.serve.service import ServedModel
from serve_helpers import GatedModel, png_bytes, running

SLACK_S = 5  # what a loaded machine may add to a deadline before the test calls it missed


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response read to its end as the server sent it (it closes the connection after the
    answers these tests expect): status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def assert_closed(sock: socket.socket) -> None:
    """The server has closed its side: the next read ends (or is reset), it does not block."""
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def assert_error(body: bytes, words: str) -> None:
    """The app's error form: one JSON object with one line under "error"."""
    answer = json.loads(body)
    assert list(answer) == ["error"] and words in answer["error"] and "\n" not in answer["error"], answer


@pytest.fixture(scope="module")
def served(blip2) -> ServedModel:
    return ServedModel(blip2, "tiny-blip2")


def test_slow_headers_are_answered_408_and_cut_off_while_others_are_served(served):
    """Sockets that send a request's head a byte at a time, or nothing at all, or a second
    request's head slowly on a kept-alive connection: each is answered 408 and closed within
    the header timeout (one deadline per request, however often a byte comes), while a normal
    request is answered meanwhile."""
    limits = Limits(header_timeout_s=1)
    with running(create_app(served, limits), limits) as url:
        head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nUser-Agent: slow\r\n\r\n"
        outcomes: dict[str, tuple[int, dict, bytes, float]] = {}

        def slow_client(name: str, first: bytes | None, dribble: bytes) -> None:
            with connect(url) as sock:
                if first is not None:  # a whole request first: the connection is kept alive after it
                    sock.sendall(first)
                    assert read_answer(sock)[0] == 200
                start = time.monotonic()
                sock.settimeout(0.25)
                for byte in dribble:
                    try:
                        sock.sendall(bytes([byte]))
                        if sock.recv(1, socket.MSG_PEEK):
                            break
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        break
                sock.settimeout(30)
                status, headers, body = read_answer(sock)
                outcomes[name] = status, headers, body, time.monotonic() - start
                assert_closed(sock)

        clients = [threading.Thread(target=slow_client, args=(f"byte-{i}", None, head)) for i in range(4)]
        clients.append(threading.Thread(target=slow_client, args=("silent", None, b"")))
        clients.append(threading.Thread(target=slow_client, args=("kept-alive", head, head)))
        for client in clients:
            client.start()
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # others are served meanwhile
        for client in clients:
            client.join(60)
        assert sorted(outcomes) == sorted(["byte-0", "byte-1", "byte-2", "byte-3", "silent", "kept-alive"])
        for name, (status, headers, body, seconds) in outcomes.items():
            assert status == 408 and headers["connection"] == "close", (name, status, headers)
            assert_error(body, "headers did not arrive within 1 s (header_timeout_s)")
            assert 0.9 < seconds < 1 + SLACK_S, (name, seconds)
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200


def test_a_body_that_stalls_is_answered_408_and_the_connection_closed(served):
    limits = Limits(body_timeout_s=1)
    with running(create_app(served, limits), limits) as url, connect(url) as sock:
        body = b'{"image": "' + b"A" * 200
        sock.sendall(b"POST /caption HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + body)  # 800 bytes short, then nothing
        start = time.monotonic()
        status, headers, answer = read_answer(sock)
        seconds = time.monotonic() - start
        assert status == 408 and headers["connection"] == "close", (status, headers)
        assert_error(answer, "nothing came for 1 s (body_timeout_s)")
        assert 0.9 < seconds < 1 + SLACK_S, seconds
        assert_closed(sock)
        caption = httpx.post(f"{url}/caption", files={"image": ("a.png", png_bytes(), "image/png")},
                             data={"max_new_tokens": "2", "num_beams": "1"}, timeout=60)
        assert caption.status_code == 200, caption.text


def test_connections_over_the_cap_are_answered_503_with_retry_after_then_served_again(served):
    """Eight connections open (each has had an answer and is kept alive): the next ones are
    answered 503 before they ask and closed; once the eight close, a request is served."""
    limits = Limits(max_connections=8)
    with running(create_app(served, limits), limits) as url:
        held = [connect(url) for _ in range(8)]
        try:
            for sock in held:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                assert read_answer(sock)[0] == 200
            for _ in range(3):
                with connect(url) as extra:
                    status, headers, body = read_answer(extra)
                    assert status == 503 and headers["retry-after"] == "1", (status, headers)
                    assert headers["connection"] == "close"
                    assert_error(body, "8 connections open, its limit (max_connections)")
                    assert_closed(extra)
            refused = httpx.get(f"{url}/healthz", timeout=30)  # a client that asks at once reads the same
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert_error(refused.content, "(max_connections)")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + SLACK_S  # the server sees the eight close a moment later
        while (status := httpx.get(f"{url}/healthz", timeout=30).status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200


def test_200_concurrent_requests_are_answered_200_or_503_with_retry_after_never_500(blip2):
    """200 captions at once against 16 connections and a queue of 4, the model held until all
    but the queued are answered: the connections over the cap and the requests over the queue
    are each answered 503 with Retry-After, the rest 200; no 500, no failed connection."""
    limits = Limits(max_connections=16, max_queue=4, max_batch=2, max_wait_ms=1, max_new_tokens=8)
    model = GatedModel(blip2)
    image = png_bytes()

    async def burst(url: str) -> list[httpx.Response]:
        pool = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=pool) as client:
            tasks = [asyncio.create_task(client.post("/caption", files={"image": ("a.png", image, "image/png")},
                                                     data={"max_new_tokens": "2", "num_beams": "1"}))
                     for _ in range(200)]
            try:
                # All but those in the model's batch and the queue are refused while the model is held.
                deadline = time.monotonic() + 120
                while sum(task.done() for task in tasks) < 200 - limits.max_batch - limits.max_queue:
                    assert time.monotonic() < deadline, "the refusals never came"
                    await asyncio.sleep(0.02)
            finally:
                model.release.set()
            return list(await asyncio.gather(*tasks))

    with running(create_app(model, limits), limits) as url:
        responses = asyncio.run(burst(url))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    refusals = [response.json()["error"] for response in responses if response.status_code == 503]
    assert all(response.headers["retry-after"] == "1" for response in responses if response.status_code == 503)
    assert any("(max_connections)" in error for error in refusals), refusals[:3]
    assert any("the server is busy" in error for error in refusals), refusals[:3]
    assert 1 <= statuses.count(200) <= limits.max_batch + limits.max_queue, statuses.count(200)
