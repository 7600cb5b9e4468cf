"""Prometheus metrics: per-request counters/histograms by adapter, engine gauges read at scrape time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lorax_mlflow.engine.outputs import RequestOutput
from lorax_mlflow.service import LoraxService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BASE_LABEL = "base"
OTHER_LABEL = "other"
DEFAULT_MAX_ADAPTER_LABELS = 32
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    """Batch size, queue, KV blocks and adapters, read from the engine when Prometheus scrapes."""

    def __init__(self, service: Callable[[], LoraxService | None]) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        service = self._service()
        if service is None:
            return
        engine = service.engine
        stats = engine.stats()
        yield GaugeMetricFamily("lorax_batch_size", "Sequences in the running batch", value=stats.num_running)
        yield GaugeMetricFamily("lorax_queue_size", "Requests waiting to be scheduled", value=stats.num_waiting)
        yield GaugeMetricFamily("lorax_kv_blocks_used", "KV cache blocks in use",
                                value=stats.kv_blocks_total - stats.kv_blocks_free)
        yield GaugeMetricFamily("lorax_kv_blocks_total", "KV cache blocks in the cache", value=stats.kv_blocks_total)
        yield GaugeMetricFamily("lorax_adapters_loaded", "Adapters resident in device slots",
                                value=stats.adapters_in_slots)
        yield GaugeMetricFamily("lorax_adapters_known", "Adapters known to the server (packaged or fetched)",
                                value=len(engine.adapters.known_adapter_ids()))
        for name, documentation, values in (
            ("lorax_speculative_draft_tokens", "Speculative draft tokens proposed and verified",
             stats.speculative_draft_tokens),
            ("lorax_speculative_accepted_tokens", "Speculative draft tokens accepted", stats.speculative_accepted_tokens),
        ):
            family = CounterMetricFamily(name, documentation, labels=("adapter",))
            for adapter, value in sorted(values.items()):
                family.add_metric((adapter or BASE_LABEL,), value)
            yield family


class ServerMetrics:
    """Per-request metrics labelled by adapter. The label values are bounded: the first
    `max_adapter_labels` adapters seen keep their own label, every later one counts as "other", so
    a client naming endless adapter ids cannot grow /metrics without bound."""

    def __init__(self, service: Callable[[], LoraxService | None],
                 max_adapter_labels: int = DEFAULT_MAX_ADAPTER_LABELS) -> None:
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self.registry = CollectorRegistry()
        labels = ("route", "adapter")
        self.requests = Counter("lorax_requests", "Requests by route, adapter and HTTP status",
                                (*labels, "status"), registry=self.registry)
        self.duration = Histogram("lorax_request_duration_seconds", "Time from arrival to the last byte",
                                  labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("lorax_request_queue_seconds", "Time waiting before the first schedule",
                                    ("adapter",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("lorax_request_time_to_first_token_seconds", "Time to the first token",
                                     ("adapter",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("lorax_prompt_tokens", "Prompt tokens processed", ("adapter",),
                                     registry=self.registry)
        self.generation_tokens = Counter("lorax_generation_tokens", "Tokens generated", ("adapter",),
                                         registry=self.registry)
        self.prefix_cache_queries = Counter("lorax_prefix_cache_queries", "Prompt tokens looked up in the KV prefix cache",
                                            ("adapter",), registry=self.registry)
        self.prefix_cache_hits = Counter("lorax_prefix_cache_hits", "Prompt tokens whose K/V the prefix cache supplied",
                                         ("adapter",), registry=self.registry)
        self.registry.register(_EngineCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, route: str) -> "RequestRecord":
        return RequestRecord(self, route)

    def adapter_label(self, adapter: str) -> str:
        if adapter == BASE_LABEL:
            return adapter
        with self._labels_lock:
            if adapter in self._labels:
                return adapter
            if len(self._labels) < self.max_adapter_labels:
                self._labels.add(adapter)
                return adapter
        return OTHER_LABEL


class RequestRecord:
    """Collects one request's numbers; :meth:`close` records them once."""

    def __init__(self, metrics: ServerMetrics, route: str) -> None:
        self._metrics = metrics
        self.route = route
        self.adapter = BASE_LABEL
        self.started = time.perf_counter()
        self._closed = False

    def output(self, output: RequestOutput) -> None:
        """Record a finished engine request's tokens and latencies."""
        self.adapter = output.adapter_id or BASE_LABEL
        m = self._metrics
        adapter = m.adapter_label(self.adapter)
        m.prompt_tokens.labels(adapter).inc(output.num_prompt_tokens)
        m.prefix_cache_queries.labels(adapter).inc(output.num_prompt_tokens)
        m.prefix_cache_hits.labels(adapter).inc(output.num_cached_tokens)
        m.generation_tokens.labels(adapter).inc(output.num_completion_tokens)
        timings = output.metrics
        if timings is not None:
            if timings.queue_time is not None:
                m.queue_time.labels(adapter).observe(timings.queue_time)
            if timings.first_token_time is not None:
                m.first_token.labels(adapter).observe(timings.first_token_time - timings.arrival_time)

    def close(self, status: int) -> None:
        if self._closed:
            return
        self._closed = True
        adapter = self._metrics.adapter_label(self.adapter)
        self._metrics.requests.labels(self.route, adapter, str(status)).inc()
        self._metrics.duration.labels(self.route, adapter).observe(time.perf_counter() - self.started)
