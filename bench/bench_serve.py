"""``serve_load``: ``qformer serve`` under a burst of concurrent ``/caption`` requests (and
``serve_openai_load``: the same through ``/v1/chat/completions`` with the ``openai`` client), with
dynamic batching (ours) against the same server answering one request per model call (the
reference: ``max_batch`` 1), the same tiny model, each server a ``qformer serve`` process on loopback (the
client in this process does not share the servers' interpreter).

One timed call sends the requests (200; 48 quick) at once (each a different picture, greedy captions of
``NEW_TOKENS`` tokens) and waits for every answer. Every answer must be 200, and the two servers'
captions identical (a batched caption equals the caption alone). The batches' mean size comes
from the server's ``/metrics``. ``http_floor_s`` is the same burst of ``GET /healthz``: what the
HTTP exchange alone costs (client and server on the same cores), which neither side can batch away;
``best_speedup_over_the_floor`` is the ratio of what is left.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import Result, time_alternately  # noqa: E402
from serve_helpers import burst, metric, png_bytes, serve_processes  # noqa: E402
from stage2_helpers import save_tiny_blip2  # noqa: E402


NEW_TOKENS = 8


async def health_burst(url: str, requests: int) -> None:
    """``requests`` GET /healthz at once from a fresh client, as :func:`burst` sends its captions:
    the cost of the HTTP exchange alone (both servers pay it per request)."""
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        responses = await asyncio.gather(*(client.get("/healthz") for _ in range(requests)))
    assert all(response.status_code == 200 for response in responses)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def chat_burst(url: str, images: list[bytes], new_tokens: int) -> list[str]:
    """Every picture's greedy answer through ``/v1/chat/completions`` with the official ``openai``
    client, all the requests in flight at once (any refusal raises)."""
    import openai

    limits = httpx.Limits(max_connections=len(images), max_keepalive_connections=len(images))
    async with httpx.AsyncClient(limits=limits, timeout=120) as http, \
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http) as client:
        def ask(data: bytes):
            image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
            return client.chat.completions.create(model=SERVED_NAME, max_tokens=new_tokens, messages=[
                {"role": "user", "content": [{"type": "text", "text": "what is in the picture"}, image]}])

        answers = await asyncio.gather(*(ask(data) for data in images))
    return [answer.choices[0].message.content for answer in answers]


SERVED_NAME = "bench"
# name -> (the burst, the batch sizes' route label, the requests' route label, what is sent)
ROUTES = {
    "serve_load": (burst, "caption", "caption", "POST /caption (forms, httpx)"),
    "serve_openai_load": (chat_burst, "chat", "v1", "POST /v1/chat/completions (the openai client)"),
}


def bench_serve(quick: bool, device: str, name: str = "serve_load") -> Result:
    send, batch_route, request_route, sent = ROUTES[name]
    requests = 48 if quick else 200
    images = [png_bytes(seed) for seed in range(requests)]
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_blip2(Path(tmp), "opt")
        common = ["--model", tmp, "--device", device, "--max-queue", str(requests + 8), "--served-model-name",
                  SERVED_NAME]
        with serve_processes([common + ["--max-batch", "16", "--max-wait-ms", "10"],
                              common + ["--max-batch", "1", "--max-wait-ms", "0.001"]]) as ((ours_url, _, _),
                                                                                            (ref_url, _, _)):
            floor_s = float(np.median([_seconds(lambda: asyncio.run(health_burst(ours_url, requests)))
                                       for _ in range(3)]))
            ours_answers = asyncio.run(send(ours_url, images, NEW_TOKENS))
            ref_answers = asyncio.run(send(ref_url, images, NEW_TOKENS))
            assert ours_answers == ref_answers, "batched answers differ from the one-at-a-time ones"
            timing = time_alternately(lambda: asyncio.run(send(ours_url, images, NEW_TOKENS)),
                                      lambda: asyncio.run(send(ref_url, images, NEW_TOKENS)), rounds=3)
            ours_metrics, ref_metrics = httpx.get(f"{ours_url}/metrics").text, httpx.get(f"{ref_url}/metrics").text
    sizes = 'qformer_batch_size_{}{{route="%s"}}' % batch_route
    mean_batch = metric(ours_metrics, sizes.format("sum")) / metric(ours_metrics, sizes.format("count"))
    answered = metric(ours_metrics, f'qformer_requests_total{{route="{request_route}",status="200"}}')
    failed = sum(float(line.split()[-1]) for line in ours_metrics.splitlines()
                 if line.startswith(f'qformer_requests_total{{route="{request_route}"') and 'status="200"' not in line)
    result = timing.into(Result(name, max_abs_diff=0.0))
    result.extra.update(requests=requests, concurrent=requests, new_tokens=NEW_TOKENS, sent=sent,
                        model="tiny OPT BLIP-2 (tests)",
                        ours_requests_per_s=requests / result.ours_s, ref_requests_per_s=requests / result.ref_s,
                        mean_batch_size=mean_batch, answered_200=int(answered), failed=int(failed),
                        model_calls=int(metric(ours_metrics, sizes.format("count"))),
                        ref_mean_batch_size=metric(ref_metrics, sizes.format("sum")) / metric(ref_metrics,
                                                                                              sizes.format("count")),
                        http_floor_s=floor_s, best_speedup_over_the_floor=(result.ref_s - floor_s) / (result.ours_s - floor_s)
                        if result.ours_s > floor_s else None,
                        ours="max_batch 16, max_wait_ms 10", ref="max_batch 1 (one request per model call)",
                        target="all answered, mean batch > 1, speedup >= 3")
    assert failed == 0 and mean_batch > 1
    return result


BENCHMARKS = {name: functools.partial(bench_serve, name=name) for name in ROUTES}
