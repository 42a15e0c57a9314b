"""GET /metrics: Prometheus text format, named after llama-server's metrics where it has one."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from vergeai.api.record import caller_of
from vergeai.errors import PermissionDenied
from vergeai.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class PoolCollector(Collector):
    """Gauges read from the workers at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The model workers' gauges, by model (a remote assistant's are its upstreams')."""
        labels = ["model"]
        processing = GaugeMetricFamily(
            "vergeai:requests_processing", "Requests being decoded.", labels=labels
        )
        deferred = GaugeMetricFamily(
            "vergeai:requests_deferred", "Requests waiting in the queue.", labels=labels
        )
        load = GaugeMetricFamily(
            "vergeai:model_load_seconds", "Seconds the model took to load.", labels=labels
        )
        loaded = GaugeMetricFamily(
            "vergeai:model_loaded", "1 when the model is loaded and serving.", labels=labels
        )
        memory = GaugeMetricFamily(
            "vergeai:model_memory_bytes",
            "Memory the loaded model holds: estimated before its load, measured after.",
            labels=["model", "kind"],
        )
        pool = self.service.pool
        for name, worker in sorted(pool.models.items()):
            processing.add_metric([name], worker.busy)
            deferred.add_metric([name], worker.queued)
            load.add_metric([name], worker.load_seconds)
            loaded.add_metric([name], 1.0 if worker.state == "online" else 0.0)
            memory.add_metric([name, "estimated"], worker.estimate.total)
            if worker.measured is not None:
                memory.add_metric([name, "measured"], worker.measured.total)
        yield from (processing, deferred, load, loaded, memory)
        loads = CounterMetricFamily("vergeai:model_loads", "Loads of the model.", labels=labels)
        unloads = CounterMetricFamily(
            "vergeai:model_unloads", "Unloads of the model (idle, evicted or asked).", labels=labels
        )
        for name, count in sorted(pool.loads.items()):
            loads.add_metric([name], count)
        for name, count in sorted(pool.unloads.items()):
            unloads.add_metric([name], count)
        held = pool.memory()
        yield from (loads, unloads)
        yield GaugeMetricFamily(
            "vergeai:memory_held_bytes", "Memory the loaded models hold.", value=held["held"]
        )
        yield GaugeMetricFamily(
            "vergeai:memory_budget_bytes",
            "The memory budget of the loaded models (0: none).",
            value=held["budget"],
        )
        yield from self._upstreams()
        limited = CounterMetricFamily(
            "vergeai:requests_limited",
            "Requests refused (429) for a user's or key's limit, by the limit.",
            labels=["reason"],
        )
        for reason, count in self.service.limits.refused.items():
            limited.add_metric([reason], count)
        yield limited

    def _upstreams(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Per upstream server of each remote assistant (configured, so bounded in number)."""
        labels = ["assistant", "upstream"]
        healthy = GaugeMetricFamily(
            "vergeai:upstream_healthy", "1 when the upstream server is healthy.", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "vergeai:upstream_requests_in_flight", "Requests at the upstream now.", labels=labels
        )
        latency = GaugeMetricFamily(
            "vergeai:upstream_latency_seconds",
            "Seconds to the first byte of the upstream's last answer.",
            labels=labels,
        )
        requests = CounterMetricFamily(
            "vergeai:upstream_requests", "Requests sent to the upstream.", labels=labels
        )
        failures = CounterMetricFamily(
            "vergeai:upstream_failures",
            "Failed requests and health checks of the upstream.",
            labels=labels,
        )
        for name, engine in sorted(self.service.pool.remotes.items()):
            for r in engine.stats()["replicas"]:  # see Replica.stats
                key = [name, r["url"]]
                healthy.add_metric(key, 1.0 if r["state"] == "healthy" else 0.0)
                in_flight.add_metric(key, r["in_flight"])
                if r["last_latency_ms"] is not None:
                    latency.add_metric(key, r["last_latency_ms"] / 1000)
                requests.add_metric(key, r["requests"])
                failures.add_metric(key, r["failures"])
        yield from (healthy, in_flight, latency, requests, failures)


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vergeai:requests", "HTTP requests.", ["assistant", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "vergeai:prompt_tokens", "Prompt tokens evaluated.", ["assistant"], registry=r
        )
        self.predicted_tokens = Counter(
            "vergeai:tokens_predicted", "Generated tokens.", ["assistant"], registry=r
        )
        self.latency = Histogram(
            "vergeai:request_duration_seconds",
            "Request latency.",
            ["assistant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vergeai:time_to_first_token_seconds",
            "Time from request to first generated token.",
            ["assistant"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        r.register(PoolCollector(service))

    def observe(
        self,
        assistant: str,
        status: int,
        seconds: float,
        usage: dict[str, int] | None,
        ttft: float | None,
    ) -> None:
        self.requests.labels(assistant, str(status)).inc()
        if assistant == "-":
            return
        self.latency.labels(assistant).observe(seconds)
        if usage:
            self.prompt_tokens.labels(assistant).inc(usage.get("prompt_tokens", 0))
            self.predicted_tokens.labels(assistant).inc(usage.get("completion_tokens", 0))
        if ttft is not None:
            self.ttft.labels(assistant).observe(ttft)


async def metrics(request: Request) -> Response:
    if not request.app.state.metrics_public and caller_of(request).user.role != "admin":
        raise PermissionDenied("/metrics needs an admin user's key")
    data = generate_latest(request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE)
