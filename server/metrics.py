"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    def __init__(self, in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("vita_sessions", "open realtime sessions", registry=self.registry)
        self.sessions_rejected = Counter(
            "vita_sessions_rejected_total", "sessions refused at capacity", registry=self.registry
        )
        self.ttft = Histogram(
            "vita_time_to_first_token_seconds", "end of user turn to first text delta",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.barge_in = Histogram(
            "vita_barge_in_seconds", "speech start to output paused", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.vad_lag = Histogram(
            "vita_vad_lag_seconds", "audio received to VAD processed", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.errors = Counter("vita_errors_total", "errors sent to clients", ["code"], registry=self.registry)
        self.requests = Counter("vita_http_requests_total", "HTTP API requests", ["endpoint"], registry=self.registry)
        in_flight_gauge = Gauge(
            "vita_engine_requests_in_flight", "unfinished engine requests", registry=self.registry
        )
        in_flight_gauge.set_function(in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
