"""Servers for the tests of ``qformer serve``: an app run by uvicorn on a free loopback port in a
thread, and tiny models to serve."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from qformer.pretrained.stage2 import Blip2
from qformer.serve.connections import server_options
from qformer.serve.limits import Limits
from qformer.serve.service import ServedModel


@contextmanager
def running(app: FastAPI, limits: Limits = Limits()) -> Iterator[str]:
    """``app`` served on 127.0.0.1 at a free port until the block ends, its connections bounded
    by ``limits`` as ``qformer serve`` bounds them; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The requests in flight get 10 s at shutdown, not request_timeout_s: the block waits 30 s for the thread.
    options = {**server_options(limits), "timeout_graceful_shutdown": 10}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def serve_process(arguments: list[str], start_s: float = 120,
                  env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``qformer serve ARGUMENTS --port N`` in a child process on a free port, up (``/healthz``
    answers) until the block ends; yields its base URL, the process and the file its output goes
    to (a file, not a pipe: a pipe nobody reads would stall the server once it filled)."""
    with serve_processes([arguments], start_s, env) as (server,):
        yield server


@contextmanager
def serve_processes(argument_lists: list[list[str]], start_s: float = 120, env: dict[str, str] | None = None
                    ) -> Iterator[list[tuple[str, subprocess.Popen, Path]]]:
    """:func:`serve_process` for several servers, started together (each pays its imports at
    the same time as the others)."""
    env = dict(os.environ, **(env or {}), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    servers = []
    try:
        for arguments in argument_lists:
            port = free_port()
            with tempfile.NamedTemporaryFile("w+", prefix="qformer-serve-", suffix=".log", delete=False) as log:
                process = subprocess.Popen([sys.executable, "-m", "qformer", "serve", *arguments, "--port", str(port)],
                                           env=env, stdout=log, stderr=subprocess.STDOUT)
            servers.append((f"http://127.0.0.1:{port}", process, Path(log.name)))
        deadline = time.monotonic() + start_s
        for url, process, log_path in servers:
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qformer serve did not start:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield servers
    finally:
        for _, process, log_path in servers:
            if process.poll() is None:
                process.terminate()
        for _, process, log_path in servers:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            log_path.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small noise picture as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gallery_folder(folder: Path, images: int = 5) -> Path:
    """``images`` noise pictures, a broken file and a texts.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (folder / f"{i}.png").write_bytes(png_bytes(i, (30 + 3 * i, 40)))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "texts.txt").write_text("a red square\ntwo cats on a mat\ngreen grass\n")
    return folder


async def burst(url: str, images: list[bytes], new_tokens: int) -> list[str]:
    """Every picture's greedy caption, all the requests in flight at once (each must answer 200)."""
    limits = httpx.Limits(max_connections=len(images), max_keepalive_connections=len(images))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def ask(data: bytes) -> str:
            response = await client.post("/caption", files={"image": ("a.png", data, "image/png")},
                                         data={"max_new_tokens": str(new_tokens), "num_beams": "1"})
            assert response.status_code == 200, (response.status_code, response.text)
            return response.json()["caption"]

        return list(await asyncio.gather(*(ask(data) for data in images)))


def metric(text: str, name: str) -> float:
    """One sample's value in Prometheus text."""
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


class GatedModel(ServedModel):
    """The tiny model behind a model call that holds until ``release`` is set, after setting
    ``entered`` (``sizes``: each call's batch size): the test, not the clock, decides what is
    queued while the model is busy (a loaded machine may take any time to send a request)."""

    def __init__(self, model: Blip2) -> None:
        super().__init__(model, "gated")
        self.entered, self.release = threading.Event(), threading.Event()
        self.sizes: list[int] = []

    def run_batch(self, key, payloads):
        self.sizes.append(len(payloads))
        self.entered.set()
        self.release.wait()
        return super().run_batch(key, payloads)


def wait_for_queue(url: str, length: int) -> None:
    """Until the server's queue holds ``length`` requests (its gauge is read at each scrape); 300 s
    only guards against a hang."""
    deadline = time.monotonic() + 300
    while metric(httpx.get(f"{url}/metrics").text, "qformer_queue_length") != length:
        assert time.monotonic() < deadline, f"the queue never held {length}"
        time.sleep(0.02)
