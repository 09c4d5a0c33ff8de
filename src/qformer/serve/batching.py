"""Dynamic batching: requests that arrive together run on the model as one batch.

Requests wait in one bounded queue. A single worker takes the oldest request, waits up to
``max_wait_s`` for others that can share its batch (the same ``key``: route and generation
settings), and runs up to ``max_batch`` of them in one call on the model thread. A full queue
refuses at once (:class:`QueueFull`, the server's 503), so a client never waits on a server
that cannot keep up. A request whose client gave up (its future cancelled) is dropped unrun.

Each request gets its own answer or its own error: the batch function returns one result or one
exception per request, and a batch whose call fails as a whole (a fault no request showed
alone) runs again one request at a time, so no request fails for another's input.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# The model's call on one batch: (key, payloads) -> one result or one exception per payload.
BatchFunction = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


@dataclass
class _Job:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """The queue and its worker. ``start`` inside the server's event loop, ``stop`` at shutdown
    (the queued requests still run, then the worker ends)."""

    def __init__(
        self,
        run: BatchFunction,
        max_batch: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
        on_batch: Callable[[Hashable, int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch and max_queue must be at least 1, max_wait_s at least 0; got "
                             f"{max_batch}, {max_queue}, {max_wait_s}")
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._stopping = False
        self._worker: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="qformer-model")  # one model call at a time

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Finish what is queued, then end the worker and the model thread."""
        self._stopping = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._model_thread.shutdown(wait=True)

    def submit(self, key: Hashable, payload: Any) -> asyncio.Future:
        """Queue one request; its future gets the result (or the exception) of its batch."""
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(key, payload, future))
        self._arrived.set()
        return future

    def call_on_model_thread(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn`` on the model thread, between batches (what cannot batch: streaming)."""
        return asyncio.get_running_loop().run_in_executor(self._model_thread, fn)

    async def _work(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._queue:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait_s
            while self._count(first.key) < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            await self._run(self._take(first.key))

    def _count(self, key: Hashable) -> int:
        return sum(1 for job in self._queue if job.key == key)

    def _take(self, key: Hashable) -> list[_Job]:
        """Up to ``max_batch`` of the queued jobs with ``key``, oldest first, out of the queue."""
        taken, kept = [], deque()
        for job in self._queue:
            (taken if job.key == key and len(taken) < self.max_batch else kept).append(job)
        self._queue = kept
        return taken

    def _drop_abandoned(self) -> None:
        self._queue = deque(job for job in self._queue if not job.future.done())

    async def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]
        if not jobs:
            return
        if self.on_batch is not None:
            self.on_batch(jobs[0].key, len(jobs))
        try:
            results = await self._call(jobs)
        except Exception as err:
            if len(jobs) == 1:
                results = [err]
            else:  # a failure only the batched call shows: each request again alone, for its own answer
                results = [await self._alone(job) for job in jobs]
        for job, result in zip(jobs, results):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    async def _call(self, jobs: list[_Job]) -> Sequence[Any]:
        """The batch function on the model thread: one result or exception per job."""
        results = await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self.run, jobs[0].key, [job.payload for job in jobs])
        if len(results) != len(jobs):
            raise RuntimeError(f"the batch function gave {len(results)} results for {len(jobs)} requests")
        return results

    async def _alone(self, job: _Job) -> Any:
        """``job`` run as a batch of one: its result or its exception (None if its client left)."""
        if job.future.done():
            return None
        try:
            return (await self._call([job]))[0]
        except Exception as err:
            return err
