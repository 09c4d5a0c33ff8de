"""The server's Prometheus metrics (``prometheus_client``), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Requests by route and status, their latencies, the queue's length, the batches' sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qformer_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("qformer_request_seconds", "Time to answer a request, by route", ["route"],
                                 registry=self.registry)
        self.queue_length = Gauge("qformer_queue_length", "Requests waiting for the model", registry=self.registry)
        self.batch_sizes = Histogram("qformer_batch_size", "Requests per model call, by route", ["route"],
                                     buckets=BATCH_BUCKETS, registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
