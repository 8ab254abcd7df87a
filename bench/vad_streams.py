"""Real-time VAD sessions per CPU core: one batched ONNX call per tick (VadBank) vs one call per stream,
with the stock Silero graph and with the rewritten one (each Conv as one batched MatMul, duplex/vad_graph.py).

Run from the repository root:

    .venv/bin/python bench/vad_streams.py
    .venv/bin/python bench/vad_streams.py --streams 1 64 512 --seconds 5

N streams of real speech (tests/data/beckett.wav plus espeak-ng sentences when the optional espeak
extra is installed, looped, each stream at its own offset) are fed 32 ms (one Silero window) per
stream per tick. The CPU time of the whole tick (push + score + segment) is measured with
time.process_time on one thread (onnxruntime intra/inter-op threads = 1), and

    streams per core at real time = N * 32 ms / (CPU ms per tick).

Columns, all measured in the same run: VadBank on the stock graph, VadBank on the rewritten graph (and
its speed-up over the stock one), and one call per stream on the stock graph. All three must produce
identical events; the table says so.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.vad import WINDOW, SileroModel, VadBank, VadEvent, VadStream

TICK_MS = WINDOW * 1000 / 16_000  # 32 ms
SENTENCES = [
    "Hello, this is a test of the voice activity detector.",
    "The quick brown fox jumps over the lazy dog.",
    "Could you tell me what the weather will be like tomorrow morning?",
]


def speech_loop() -> tuple[np.ndarray, str]:
    import soundfile as sf

    beckett, rate = sf.read(ROOT / "tests" / "data" / "beckett.wav", dtype="float32")
    assert rate == 16_000
    parts, source = [beckett], "beckett.wav"
    try:
        from duplex.tts import EspeakTTS, EspeakUnavailableError, resample

        tts = EspeakTTS()
        gap = np.zeros(8000, np.float32)
        for text in SENTENCES:
            parts += [gap, resample(tts.synthesize_blocking(text), tts.sample_rate, 16_000)]
        source += " + espeak-ng"
    except EspeakUnavailableError:
        pass
    audio = np.concatenate(parts)
    noise = np.random.default_rng(0).standard_normal(audio.size).astype(np.float32) * 0.003
    return audio + noise, source


def run_batched(model: SileroModel, audio: np.ndarray, n: int, ticks: int) -> tuple[float, list]:
    bank = VadBank(model)
    for i in range(n):
        bank.add_stream(i)
    offsets = _offsets(audio, n)
    events: list[list[VadEvent]] = [[] for _ in range(n)]
    doubled = np.concatenate([audio, audio])
    cpu = 0.0
    for k in range(ticks):
        t0 = time.process_time()
        for i in range(n):
            o = (offsets[i] + k * WINDOW) % audio.size
            bank.push(i, doubled[o : o + WINDOW])
        out = bank.process()
        cpu += time.process_time() - t0
        for sid, ev in out:
            events[sid].append(ev)
    return cpu, events


def run_per_stream(model: SileroModel, audio: np.ndarray, n: int, ticks: int) -> tuple[float, list]:
    streams = [VadStream() for _ in range(n)]
    offsets = _offsets(audio, n)
    events: list[list[VadEvent]] = [[] for _ in range(n)]
    doubled = np.concatenate([audio, audio])
    cpu = 0.0
    for k in range(ticks):
        t0 = time.process_time()
        out = []
        for i, s in enumerate(streams):
            o = (offsets[i] + k * WINDOW) % audio.size
            s.push(doubled[o : o + WINDOW])
            out.append(s.process(model))
        cpu += time.process_time() - t0
        for i, evs in enumerate(out):
            events[i].extend(evs)
    return cpu, events


def _offsets(audio: np.ndarray, n: int) -> list[int]:
    # spread the streams over the loop so that they are not all in speech at once
    return [(i * 7919 * WINDOW) % audio.size for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 32, 256, 1024])
    ap.add_argument("--seconds", type=float, default=3.0, help="audio per stream per measurement")
    args = ap.parse_args()

    import onnxruntime

    stock, rewritten = SileroModel(graph="stock"), SileroModel(graph="batched")
    if rewritten.graph != "batched":
        print("# WARNING: the graph rewrite failed (see the log); both batched columns run the stock graph")
    audio, source = speech_loop()
    ticks = max(1, int(args.seconds * 1000 / TICK_MS))
    print(
        f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__} (1 thread), model {stock.path.name}"
    )
    print(f"# audio: {source}, {audio.size / 16_000:.1f} s looped; {ticks} ticks of {TICK_MS:.0f} ms")
    print("# ms/tick = CPU ms per 32 ms tick; s/core = real-time streams per core")
    header = (
        f"{'streams':>7} | {'stock batched ms':>16} | {'s/core':>6} | {'rewritten batched ms':>20} | "
        f"{'s/core':>6} | {'rewr/stock':>10} | {'per-stream ms':>13} | {'s/core':>6} | events"
    )
    print(header)
    print("-" * len(header))
    for n in args.streams:
        run_batched(stock, audio, n, 2)  # warm-up
        run_batched(rewritten, audio, n, 2)
        cpu_b, ev_b = run_batched(stock, audio, n, ticks)
        cpu_r, ev_r = run_batched(rewritten, audio, n, ticks)
        cpu_s, ev_s = run_per_stream(stock, audio, n, ticks)
        ms_b, ms_r, ms_s = (cpu * 1000 / ticks for cpu in (cpu_b, cpu_r, cpu_s))
        cap_b, cap_r, cap_s = (n * TICK_MS / ms for ms in (ms_b, ms_r, ms_s))
        same = "same" if ev_b == ev_r == ev_s else "DIFFER"
        n_events = sum(len(e) for e in ev_b)
        print(
            f"{n:>7} | {ms_b:>16.3f} | {cap_b:>6.0f} | {ms_r:>20.3f} | {cap_r:>6.0f} | "
            f"{cap_r / cap_b:>9.2f}x | {ms_s:>13.3f} | {cap_s:>6.0f} | {same} ({n_events})"
        )


if __name__ == "__main__":
    main()
