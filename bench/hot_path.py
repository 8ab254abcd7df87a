"""The realtime input path's steps, one 20 ms `input_audio_buffer.append` at a time: CPU µs per event for
each step with issue 14's change and without it, side by side in one run (thread CPU time, best of 7
repeats, so other load on the machine matters less than in bench/load.py, which measures them together).

Steps: parsing the event (the general parser: json + surrogate re-check + pydantic, vs the append fast path:
orjson + type checks); base64 (b64decode(validate=True) vs binascii strict mode); PCM16 -> float32 (astype
and divide vs one multiply); the idle timeout (asyncio.timeout armed per receive vs a per-session timer, on
uvloop as the server runs); the VAD's batched rounds at 100 open streams of which a tenth have new audio
(a scan of every stream vs of those pushed to); and, for scale, the steps no switch changes (resampling
24 -> 16 kHz, the echo gate, the VAD: a push and its share of the batched rounds at 100 streams).
Not here: the WebSocket layer (the "ws" switch; bench/load.py measures it with everything else).

Run:  .venv/bin/python bench/hot_path.py        (~1 min)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.echo import EchoGate, EchoGateParams, EchoGuard, EchoGuardParams
from duplex.vad import SileroModel, VadBank
from server.resampling import StreamResampler
from server.wire.audio_codec import AudioFormat, decode
from server.wire.client_events import parse_audio_append, parse_client_event

EVENTS_PER_S = 50  # 20 ms events


def cost(fn: Callable[[], object], number: int = 20000) -> float:
    """CPU µs per call of fn: the best of 7 repeats (thread time)."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=7, timer=time.thread_time)) / number * 1e6


def idle_costs(messages: int = 20000) -> tuple[float, float]:
    """µs per received message: `async with asyncio.timeout(600)` around an awaited receive, vs none (the
    per-session timer costs one attribute store per event)."""
    async def run(with_timeout: bool) -> float:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()

        async def consumer() -> None:
            for _ in range(messages):
                if with_timeout:
                    async with asyncio.timeout(600):
                        await queue.get()
                else:
                    await queue.get()
                    loop.time()

        task = asyncio.create_task(consumer())
        t = time.thread_time()
        for _ in range(messages):
            queue.put_nowait(0)
            await asyncio.sleep(0)  # the consumer wakes once per message, as the reader does
        await task
        return (time.thread_time() - t) / messages * 1e6

    try:
        import uvloop
        runner: Callable[..., float] = uvloop.run
    except ImportError:
        runner = asyncio.run
    best = [min(runner(run(w)) for _ in range(5)) for w in (True, False)]
    return best[0], best[1]


def vad_round_costs(model: SileroModel, streams: int = 100) -> tuple[float, float]:
    """µs per event of finding the streams with a window to score, with `streams` open: VadHub runs a round
    every 10 ms, and between two rounds half of 100 real-time sessions push an event. A round after no push
    costs exactly that search: a scan of every stream vs of the pushed ones (none here)."""
    out = []
    for scan_all in (True, False):
        bank = VadBank(model, scan_all=scan_all)
        for sid in range(streams):
            bank.add_stream(sid)
        out.append(cost(bank.process) / (streams / 2))
    return out[0], out[1]


def vad_per_event(model: SileroModel, streams: int = 100) -> float:
    """µs per event of pushing 20 ms to the VAD and scoring it in rounds every 10 ms (half the streams pushed
    between rounds, ~31 windows per batch), as the server's VadHub does at 100 sessions."""
    bank = VadBank(model)
    for sid in range(streams):
        bank.add_stream(sid)
    x = (np.random.default_rng(1).standard_normal(320) * 0.01).astype(np.float32)

    def second() -> None:  # one second of audio for every stream
        for tick in range(100):
            for sid in range(tick % 2 * streams // 2, (tick % 2 + 1) * streams // 2):
                bank.push(sid, x)
            bank.process()

    return cost(second, 3) / (streams * EVENTS_PER_S)


def main() -> None:
    pcm = (np.random.default_rng(0).standard_normal(480) * 3000).astype("<i2")
    audio = base64.b64encode(pcm.tobytes()).decode()
    text = json.dumps({"type": "input_audio_buffer.append", "audio": audio})
    raw = base64.b64decode(audio)
    fmt = AudioFormat("pcm16", 24000)
    model = SileroModel()
    t_timeout, t_timer = idle_costs()
    vad_all, vad_pushed = vad_round_costs(model)
    rows = [
        ("append", "parse the event", cost(lambda: parse_client_event(text)), cost(lambda: parse_audio_append(text))),
        ("(no switch)", "base64 -> bytes", cost(lambda: base64.b64decode(audio, validate=True)),
         cost(lambda: binascii.a2b_base64(audio, strict_mode=True))),
        ("(no switch)", "PCM16 -> float32", cost(lambda: np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0),
         cost(lambda: decode(raw, fmt))),
        ("idle", "idle timeout per received event", t_timeout, t_timer),
        ("vad", "VAD round bookkeeping, 100 streams open", vad_all, vad_pushed),
    ]
    to16, samples = StreamResampler(24000, 16000), decode(raw, fmt)
    gate = EchoGate(EchoGuard(EchoGuardParams(output_rate=24000)), EchoGateParams(decision_ms=100.0))
    x16 = to16(samples)
    unchanged = [
        ("resample 24 -> 16 kHz (streaming)", cost(lambda: to16(samples))),
        ("echo gate: push_mic", cost(lambda: gate.push_mic(x16))),
        ("VAD: push + batched rounds (100 streams)", vad_per_event(model)),
    ]
    print(f"# {sys.version.split()[0]}, numpy {np.__version__}; CPU us per 20 ms append event "
          f"(x {EVENTS_PER_S} = ms per session-second / 1000)")
    print(f"{'switch':<12} {'step':<42} {'before us':>10} {'after us':>9} {'saved ms/session-s':>19}")
    for switch, step, before, after in rows:
        print(f"{switch:<12} {step:<42} {before:>10.2f} {after:>9.2f} {(before - after) * EVENTS_PER_S / 1000:>19.3f}")
    print("\nunchanged steps, for scale")
    for step, us in unchanged:
        print(f"{'':<12} {step:<42} {us:>10.2f} {'':>9} {us * EVENTS_PER_S / 1000:>16.3f} ms/s")


if __name__ == "__main__":
    main()
