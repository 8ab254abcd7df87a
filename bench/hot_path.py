"""The realtime input path's steps, one 20 ms `input_audio_buffer.append` at a time: CPU µs per event for
each step with issue 14's change and without it, side by side in one run (thread CPU time, best of 7
repeats, so other load on the machine matters less than in bench/load.py, which measures them together).

Steps: parsing the event (the general parser: json + surrogate re-check + pydantic, vs the append fast path:
orjson + type checks); base64 (b64decode(validate=True) vs binascii strict mode); PCM16 -> float32 (astype
and divide vs one multiply); the idle timeout (asyncio.timeout armed per receive vs a per-session timer, on
uvloop as the server runs); the VAD's batched rounds at 100 open streams of which a tenth have new audio
(a scan of every stream vs of those pushed to); and, for scale, the steps no switch changes (the VAD: a push
and its share of the batched rounds at 100 streams).
The WebSocket layer: a frame's way from data_received to the application's queue (websockets' parser
and uvicorn's dispatch vs server/ws_protocol.py's own text frame parsing, the "wsframe" switch). Not here:
the rest of it (the "ws" switch; bench/load.py measures it with everything else).

Rows "(round 2)": issue 14's second round, no switch (the old way, written out here, vs the code as it is):
the append model built by `model_validate` vs by its validator; base64 by binascii's strict mode vs
`decode_base64` (pybase64 first); PCM16 -> float32 by the numpy scalar vs the 0-d array; resampling
24 -> 16 kHz by a concatenation and numpy's product over the strided windows per chunk vs the preallocated
buffer and the grouped BLAS product; the echo gate's ring write in a loop vs one slice. (The connection's
`_check_append` needs a session: not here.)

Rows "(pass 5)": issue 14's fifth pass, no switch: the append's model vs its two fields (what the direct
path now reads); a 20 ms PCM16 chunk to 16 kHz as an int16 view scaled into a float32 buffer vs its bytes
copied into the int16 buffer of a resampler made for PCM16 (`pcm16_input`; the same float32 output, bit for
bit).

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
from typing import Any

import numpy as np
import uvicorn
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.protocol import State

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.echo import EchoGate, EchoGateParams, EchoGuard, EchoGuardParams
from duplex.vad import SileroModel, VadBank
from models.resample import _apply, sinc_kernel
from server.resampling import StreamResampler
from server.wire.audio_codec import PCM16_SCALE, AudioFormat, decode, pcm16_samples
from server.wire.client_events import AudioAppend, audio_append_fields, parse_audio_append, parse_client_event
from server.wire.inline_data import decode_base64
from server.ws_protocol import ParsedByWebsocketsProtocol, ReadAheadWebSocketProtocol

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


class _NullTransport:
    """A socket that takes every write and pause: the protocol's receive path alone is measured."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


WS_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def ws_frame_costs(text: str) -> tuple[float, float]:
    """µs per received append frame (one TCP read) from the WebSocket protocol's data_received to the
    message in the application's queue, taken out again: with every frame parsed by websockets and
    dispatched by uvicorn ("wsframe" off) vs the protocol's own text frame parsing."""
    frame = Frame(Opcode.TEXT, text.encode()).serialize(mask=True)

    async def run(cls: type[ReadAheadWebSocketProtocol]) -> float:
        stop = asyncio.Event()

        async def app(scope: object, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            await stop.wait()  # never reads: the measured step takes the message from the queue itself

        config = uvicorn.Config(app, ws_max_size=1 << 20, ws_per_message_deflate=False, log_level="warning")
        config.load()
        state = ServerState()
        protocol = cls(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
        protocol.connection_made(_NullTransport())  # type: ignore[arg-type]
        protocol.data_received(WS_HANDSHAKE)
        while protocol.conn.state is not State.OPEN:
            await asyncio.sleep(0)

        def receive_one() -> None:
            protocol.data_received(frame)
            protocol.queue.get_nowait()
            protocol._queued_bytes = 0  # what receive() gives back

        us = cost(receive_one)
        stop.set()
        await asyncio.gather(*state.tasks)
        return us

    return asyncio.run(run(ParsedByWebsocketsProtocol)), asyncio.run(run(ReadAheadWebSocketProtocol))


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


class ConcatResampler:
    """`StreamingResampler` before the preallocated buffer: a new array and view per chunk and numpy's own
    product over the strided windows (`_apply`), called through a wrapper as the server's was."""

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        self._kernel = sinc_kernel(orig_rate, new_rate)
        self._pending = np.zeros(self._kernel.width, np.float32)
        self._received = self._emitted = 0

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return self._stream(samples)

    def _stream(self, samples: np.ndarray) -> np.ndarray:
        chunk = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._received += chunk.size
        return self._run(np.concatenate((self._pending, chunk)))

    def _run(self, buf: np.ndarray) -> np.ndarray:
        kernel = self._kernel
        out = _apply(kernel, buf)
        self._pending = buf[out.size // kernel.new * kernel.orig :]
        self._emitted += out.size
        return out


def push_mic_loop(gate: EchoGate, samples: np.ndarray) -> list[object]:
    """`EchoGate.push_mic` before: the sample-type checks every time and the ring written in a loop."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono 1-D samples, got shape {x.shape}")
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32, copy=False)
    size = gate._ring.size
    if x.size > size:
        gate._end += x.size - size
        x = x[-size:]
    while x.size:
        i = gate._end % size
        n = min(x.size, size - i)
        gate._ring[i : i + n] = x[:n]
        gate._end += n
        x = x[n:]
    gp = gate.guard.params
    gate.guard.forget_before(gate.mic_end - gp.history_s * gp.mic_rate)
    if gate._seg is not None:
        raise AssertionError("the bench's gate has no segment")
    return []


def main() -> None:
    pcm = (np.random.default_rng(0).standard_normal(480) * 3000).astype("<i2")
    audio = base64.b64encode(pcm.tobytes()).decode()
    text = json.dumps({"type": "input_audio_buffer.append", "audio": audio})
    raw = base64.b64decode(audio)
    fmt = AudioFormat("pcm16", 24000)
    model = SileroModel()
    t_timeout, t_timer = idle_costs()
    ws_off, ws_on = ws_frame_costs(text)
    vad_all, vad_pushed = vad_round_costs(model)
    rows = [
        ("wsframe", "receive its WebSocket frame (protocol)", ws_off, ws_on),
        ("append", "parse the event", cost(lambda: parse_client_event(text)), cost(lambda: parse_audio_append(text))),
        ("(no switch)", "base64 -> bytes", cost(lambda: base64.b64decode(audio, validate=True)),
         cost(lambda: binascii.a2b_base64(audio, strict_mode=True))),
        ("(no switch)", "PCM16 -> float32", cost(lambda: np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0),
         cost(lambda: decode(raw, fmt))),
        ("idle", "idle timeout per received event", t_timeout, t_timer),
        ("vad", "VAD round bookkeeping, 100 streams open", vad_all, vad_pushed),
    ]
    data = json.loads(text)
    to16, old16, samples = StreamResampler(24000, 16000), ConcatResampler(24000, 16000), decode(raw, fmt)
    gate, old_gate = (EchoGate(EchoGuard(EchoGuardParams(output_rate=24000)), EchoGateParams(decision_ms=100.0))
                      for _ in range(2))
    x16 = to16(samples)
    scale = np.float32(1 / 32768)
    second = [  # issue 14's second round (no switch): the old way, written out above or here, vs the code
        ("append model: model_validate / validator", cost(lambda: AudioAppend.model_validate(data)),
         cost(lambda: AudioAppend.__pydantic_validator__.validate_python(data))),
        ("base64: binascii strict / decode_base64", cost(lambda: binascii.a2b_base64(audio, strict_mode=True)),
         cost(lambda: decode_base64(audio, "audio", allow_empty=True))),
        ("PCM16 -> float32: scalar / 0-d array", cost(lambda: np.frombuffer(raw, dtype="<i2") * scale),
         cost(lambda: decode(raw, fmt))),
        ("resample 24 -> 16 kHz (streaming)", cost(lambda: old16(samples)), cost(lambda: to16(samples))),
        ("echo gate: push_mic", cost(lambda: push_mic_loop(old_gate, x16)), cost(lambda: gate.push_mic(x16))),
    ]
    to16_scaled, to16_bytes = StreamResampler(24000, 16000), StreamResampler(24000, 16000, pcm16_input=True)
    fifth = [  # issue 14's fifth pass (no switch)
        ("append: the model / its two fields", cost(lambda: parse_audio_append(text)),
         cost(lambda: audio_append_fields(text))),
        ("PCM16 -> 16 kHz: int16 view, scaled / bytes", cost(lambda: to16_scaled.scaled(pcm16_samples(raw), PCM16_SCALE)),
         cost(lambda: to16_bytes.pcm16(raw))),
    ]
    unchanged = [
        ("VAD: push + batched rounds (100 streams)", vad_per_event(model)),
    ]
    print(f"# {sys.version.split()[0]}, numpy {np.__version__}; CPU us per 20 ms append event "
          f"(x {EVENTS_PER_S} = ms per session-second / 1000)")
    print(f"{'switch':<12} {'step':<42} {'before us':>10} {'after us':>9} {'saved ms/session-s':>19}")
    for switch, step, before, after in rows:
        print(f"{switch:<12} {step:<42} {before:>10.2f} {after:>9.2f} {(before - after) * EVENTS_PER_S / 1000:>19.3f}")
    for step, before, after in second:
        print(f"{'(round 2)':<12} {step:<42} {before:>10.2f} {after:>9.2f} "
              f"{(before - after) * EVENTS_PER_S / 1000:>19.3f}")
    for step, before, after in fifth:
        print(f"{'(pass 5)':<12} {step:<42} {before:>10.2f} {after:>9.2f} "
              f"{(before - after) * EVENTS_PER_S / 1000:>19.3f}")
    print("\nunchanged steps, for scale")
    for step, us in unchanged:
        print(f"{'':<12} {step:<42} {us:>10.2f} {'':>9} {us * EVENTS_PER_S / 1000:>16.3f} ms/s")


if __name__ == "__main__":
    main()
