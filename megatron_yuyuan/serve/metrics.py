"""``GET /metrics`` in Prometheus' text format: requests by endpoint and status, the queue and the
running batch, prompt and generated tokens, time to first token and per-token latency.

Each app has its own registry (two servers in one process, as tests make, do not share counts).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's instruments (names prefixed ``yuyuan_``)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "yuyuan_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.queue = Gauge("yuyuan_queue_length", "requests waiting for a row", registry=r)
        self.running = Gauge("yuyuan_running_batch_size", "requests being decoded", registry=r)
        self.prompt_tokens = Counter("yuyuan_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter(
            "yuyuan_generation_tokens", "tokens generated (EOS excluded)", registry=r
        )
        self.ttft = Histogram(
            "yuyuan_time_to_first_token_seconds",
            "from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "yuyuan_time_per_output_token_seconds",
            "mean time between a request's tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, request, now: float) -> None:
        """A request's answer is complete (or it was stopped)."""
        n = len(request.ids)
        self.generated_tokens.inc(n)
        if n > 1 and request.first_token is not None:
            self.per_token.observe((now - request.first_token) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
