"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
LOOP_LAG_PERIOD_S = 0.1  # how often the event loop's lag is measured


class Metrics:
    def __init__(
        self,
        in_flight: Callable[[], float],
        engines_serving: Callable[[], float] = lambda: 0.0,
        degraded: Callable[[], float] = lambda: 0.0,
        vad_worker: Callable[[], float] = lambda: 0.0,
    ) -> None:
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
        self.speech_stop = Histogram(
            "vita_tts_stop_seconds", "an answer cancelled (a barge-in's state token, a client cancel) to its speech "
            "synthesis stopped (the vita voice: its decoder request aborted in vLLM)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=self.registry,
        )
        self.tts_in_flight = Gauge(
            "vita_tts_requests_in_flight", "unfinished speech-decoder requests in the vita voice's engine",
            registry=self.registry,
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
        Gauge("vita_engines_serving", "engines up and taking requests", registry=self.registry).set_function(
            engines_serving
        )
        Gauge(
            "vita_engines_degraded", "1 while an engine is down and the others serve its role (/ready stays 200)",
            registry=self.registry,
        ).set_function(degraded)
        Gauge(
            "vita_vad_worker", "1 while the VAD's model runs in its worker process, 0 while on the event loop",
            registry=self.registry,
        ).set_function(vad_worker)
        self.engine_restarts = Counter(
            "vita_engine_restarts_total", "engines restarted after their process died", registry=self.registry
        )

        self.loop_lag = Gauge(
            "vita_event_loop_lag_seconds", f"how late the event loop ran its last check (every {LOOP_LAG_PERIOD_S:g} s): "
            "what every session and /health waited", registry=self.registry,
        )
        self.loop_stalls = Histogram(
            "vita_event_loop_stall_seconds", "event loop lag of each check", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Set by the app (set_function) from its live sessions.
        self.session_memory = Gauge(
            "vita_session_memory_bytes", "memory held by all realtime sessions: camera frames, buffered audio, "
            "pending items, history", registry=self.registry,
        )
        self.session_memory_max = Gauge(
            "vita_session_memory_max_bytes", "the most any one realtime session holds", registry=self.registry
        )
        self.sessions_ended_in_memory = Gauge(
            "vita_sessions_ended_in_memory", "realtime sessions that have ended but are not yet freed: each should "
            "go within a moment of its end; a count that grows is memory leaking", registry=self.registry,
        )
        self.chat_aborted = Counter(
            "vita_chat_requests_aborted_total", "chat completions whose engine request was aborted before it ended "
            "(the client went away)", registry=self.registry,
        )
        self.requests_ended_in_memory = Gauge(
            "vita_chat_requests_ended_in_memory", "chat completions that have ended but are not yet freed (their "
            "prompt's audio and images with them): each should go within a moment of its end", registry=self.registry,
        )
        self.session_memory_budget = Gauge(
            "vita_session_memory_budget_bytes", "what one session may hold (session_memory_mib)", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def watch_loop_lag(self, period_s: float = LOOP_LAG_PERIOD_S) -> None:
        """Forever: sleep `period_s` and record how much later than that the loop woke (run as a task)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(period_s)
            lag = max(0.0, loop.time() - start - period_s)
            self.loop_lag.set(lag)
            self.loop_stalls.observe(lag)
