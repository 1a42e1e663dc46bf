"""What `GET /metrics` exports, in Prometheus' text format (prometheus_client, one registry per app)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from duospec.stats import GenerationStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
if hasattr(prometheus_client, "disable_created_metrics"):
    prometheus_client.disable_created_metrics()  # the *_created series only add noise here
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
_RATE_BUCKETS = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_SECONDS = 60.0  # the total tokens/s gauge counts the requests finished this long ago or less


class ServerMetrics:
    """Counters the handlers and the generating thread update; gauges read the queue when scraped.

    prometheus_client's metrics are thread-safe; the running sums behind the mean accepted tokens per
    pass are kept here under a lock, since a Counter's value is not public API.
    """

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int], max_batch: int = 1, pass_curve: Callable[[], dict | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter("duospec_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("duospec_prompt_tokens", "prompt tokens of the requests generated for", registry=self.registry)
        self.generation_tokens = Counter("duospec_generation_tokens", "tokens generated", ["method"], registry=self.registry)
        self.target_passes = Counter("duospec_target_passes", "forward passes of the target model", ["method"], registry=self.registry)
        self.request_seconds = Histogram("duospec_request_seconds", "time from a request's arrival to its last token", registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.queue_seconds = Histogram("duospec_queue_seconds", "time a request waited for the model", registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.ttft_seconds = Histogram("duospec_time_to_first_token_seconds", "time from the start of generation to its first token", registry=self.registry, buckets=_LATENCY_BUCKETS)
        Gauge("duospec_queue_depth", "requests waiting for the model", registry=self.registry).set_function(queue_depth)
        Gauge("duospec_requests_running", "requests generating now", registry=self.registry).set_function(running)
        Gauge("duospec_mean_accepted_tokens_per_pass", "generated tokens per target pass, over all requests since start", registry=self.registry).set_function(self.mean_accepted)
        # Continuous batching (duospec/batching.py): the batch each joint target pass served, and per
        # request in it whether its pass scored drafts (speculation on), its next token only (off) or its prompt.
        Gauge("duospec_max_batch", "requests that may generate at once (--max-batch)", registry=self.registry).set(max_batch)
        self.batch_size = Histogram("duospec_batch_size", "requests in each target pass", registry=self.registry, buckets=_BATCH_BUCKETS)
        self.batch_tokens = Histogram("duospec_batch_tokens", "tokens in each target pass, all requests together", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self.lane_passes = Counter("duospec_request_passes", "each request's share of the target passes, by what it held", ["speculation"], registry=self.registry)
        self.request_rate = Histogram("duospec_request_tokens_per_second", "each request's generated tokens per second, from its first token", registry=self.registry, buckets=_RATE_BUCKETS)
        Gauge("duospec_tokens_per_second", f"tokens per second of all requests together, over the requests finished in the last {RATE_WINDOW_SECONDS:.0f} s", registry=self.registry).set_function(self.total_rate)
        self.registry.register(_PassCurve(pass_curve))
        self._lock = threading.Lock()
        self._tokens = 0
        self._passes = 0
        self._finished: deque[tuple[float, int]] = deque()  # (end time, tokens) of recent requests

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def record_generation(self, stats: GenerationStats, queue_seconds: float, request_seconds: float) -> None:
        """One finished (or cut short) generation's figures."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.labels(method=stats.method).inc(stats.new_tokens)
        self.target_passes.labels(method=stats.method).inc(stats.target_passes)
        self.queue_seconds.observe(queue_seconds)
        self.request_seconds.observe(request_seconds)
        if stats.ttft_seconds is not None:
            self.ttft_seconds.observe(stats.ttft_seconds)
        if stats.new_tokens > 1 and stats.generation_tokens_per_second:
            self.request_rate.observe(stats.generation_tokens_per_second)
        with self._lock:
            self._tokens += stats.new_tokens
            self._passes += stats.target_passes
            self._finished.append((time.monotonic(), stats.new_tokens))

    def record_pass(self, record) -> None:
        """One joint target pass (models/joint.py's PassRecord)."""
        self.batch_size.observe(record.lanes)
        self.batch_tokens.observe(record.tokens)
        self.lane_passes.labels(speculation="on").inc(record.drafting_lanes)
        self.lane_passes.labels(speculation="prompt").inc(record.prompt_lanes)
        self.lane_passes.labels(speculation="off").inc(record.lanes - record.drafting_lanes - record.prompt_lanes)

    def total_rate(self) -> float:
        """The tokens of the requests finished within the last RATE_WINDOW_SECONDS, divided by it."""
        now = time.monotonic()
        with self._lock:
            while self._finished and now - self._finished[0][0] > RATE_WINDOW_SECONDS:
                self._finished.popleft()
            tokens = sum(count for _, count in self._finished)
        return tokens / RATE_WINDOW_SECONDS

    def mean_accepted(self) -> float:
        with self._lock:
            return self._tokens / self._passes if self._passes else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PassCurve:
    """`duospec_target_pass_seconds{tokens}`: the measured cost curve the budgets and the default batch
    rest on (once measured; read at each scrape), so what a batch may gain is seen from outside."""

    def __init__(self, curve: Callable[[], dict | None]) -> None:
        self._curve = curve

    def collect(self):
        family = GaugeMetricFamily("duospec_target_pass_seconds", "measured seconds of one target pass over n tokens (the cost curve)", labels=["tokens"])
        for tokens, seconds in sorted((self._curve() or {}).items()):
            family.add_metric([str(tokens)], float(seconds))
        yield family
