"""Input transcription: word error rate (WER) and real-time factor per recording and backend.

Run from the repository root:

    .venv/bin/python bench/transcription.py                                  # pocketsphinx only
    .venv/bin/python bench/transcription.py --http-url http://127.0.0.1:8001/v1 --http-model openai/whisper-large-v3
    .venv/bin/python bench/transcription.py --backends http --http-url ...   # the server only

Recordings: tests/data/beckett.wav, two_cities.wav, endgame_nagg_nell.wav (16 kHz mono; provenance in
tests/data/README.md). References are in tests/data/transcripts.json. Two modes (``--modes``): ``whole`` sends each file in one call;
``turns`` cuts it where it pauses for 0.5 s or more (as the server's default VAD ends a turn; an energy
threshold here, not the server's VAD) and sends each turn alone, as the server transcribes a
conversation, then joins the texts. WER = (substitutions + deletions + insertions) / reference words
after lower-casing and dropping punctuation (`duplex.transcription.word_error_rate`); the "all files"
row pools the files (total errors / total reference words).

Real-time factor (RTF) = seconds spent / seconds of audio (below 1 is faster than real time):
``wall`` is what a user waits (the calls, from the event loop's side, median of --repeats);
``cpu`` is the pocketsphinx worker process's CPU time (user + system) for the same call, which
contention from other processes on the machine barely inflates. Backends are warmed up first (workers
started, model loaded); the warm-up time is printed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.transcription import (
    PocketsphinxTranscriber,
    Transcriber,
    TranscriptionSettings,
    make_transcriber,
    normalize_words,
    word_error_rate,
)

DATA = ROOT / "tests" / "data"
FILES = ["beckett.wav", "two_cities.wav", "endgame_nagg_nell.wav"]


def load_16k(path: Path) -> np.ndarray:
    import soundfile as sf

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != 16_000:
        from duplex.tts import resample

        audio = resample(audio, rate, 16_000)
    return np.asarray(audio, dtype=np.float32)


def split_turns(audio: np.ndarray, min_pause_s: float = 0.5, pad_s: float = 0.2) -> list[np.ndarray]:
    """The recording cut where it pauses for ``min_pause_s`` or more (the server's default VAD ends a turn
    after 500 ms of silence), each piece padded by ``pad_s``: what the server would transcribe turn by
    turn. Speech = 20 ms frames louder (RMS) than a tenth of the 95th percentile frame; the recordings are
    clean, so an energy threshold finds their pauses (it is not the server's VAD)."""
    n = 320
    frames = len(audio) // n
    rms = np.sqrt((audio[: frames * n].reshape(frames, n) ** 2).mean(axis=1))
    speech = rms > max(0.1 * float(np.percentile(rms, 95)), 1e-4)
    spans: list[tuple[int, int]] = []
    start: int | None = None
    end = silent = 0
    for i, loud in enumerate(speech):
        if loud:
            start = i if start is None else start
            end, silent = i + 1, 0
        elif start is not None:
            silent += 1
            if silent * n >= min_pause_s * 16_000:
                spans.append((start, end))
                start = None
    if start is not None:
        spans.append((start, end))
    pad = round(pad_s * 16_000)
    return [audio[max(0, a * n - pad) : min(len(audio), b * n + pad)] for a, b in spans]


def word_errors(reference: str, hypothesis: str) -> int:
    return round(word_error_rate(reference, hypothesis) * len(normalize_words(reference)))


def worker_cpu_s(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def run_backend(
    name: str,
    transcriber: Transcriber,
    files: list[str],
    modes: list[str],
    refs: dict[str, Any],
    repeats: int,
) -> list[dict[str, Any]]:
    started = time.perf_counter()
    await transcriber.warmup()
    print(
        f"# {name}: warm-up (workers started, model loaded) {time.perf_counter() - started:.2f} s", flush=True
    )
    pid = None
    if isinstance(transcriber, PocketsphinxTranscriber):
        pid, nice = await transcriber.worker_info()
        print(f"# {name}: worker pid {pid}, nice {nice}", flush=True)
    rows = []
    for file, mode in [(f, m) for f in files for m in modes]:
        audio = load_16k(DATA / file)
        pieces = [audio] if mode == "whole" else split_turns(audio)
        walls, cpus, text = [], [], ""
        for _ in range(repeats):
            cpu0 = worker_cpu_s(pid)
            t0 = time.perf_counter()
            texts = [(await transcriber.transcribe(piece)).text for piece in pieces]
            walls.append(time.perf_counter() - t0)
            cpus.append(worker_cpu_s(pid) - cpu0)
            text = " ".join(t for t in texts if t)
        ref = refs[file]["text"]
        audio_s = sum(len(p) for p in pieces) / 16_000  # turns: the padded pieces, what was sent
        rows.append(
            {
                "file": file if mode == "whole" else f"{file} ({len(pieces)} turns)",
                "backend": name,
                "mode": mode,
                "audio_s": audio_s,
                "words": len(normalize_words(ref)),
                "errors": word_errors(ref, text),
                "wer": word_error_rate(ref, text),
                "rtf_wall": statistics.median(walls) / audio_s,
                "rtf_cpu": statistics.median(cpus) / audio_s,
                "text": text,
            }
        )
    await transcriber.aclose()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    head = f"{'file':<34} {'backend':<13} {'audio s':>7} {'words':>5} {'errors':>6} {'WER':>6} {'RTF wall':>8} {'RTF cpu':>7}"
    print(head)
    print("-" * len(head))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["mode"]), []).append(r)
    for (backend, mode), group in groups.items():
        for r in group:
            cpu = "-" if np.isnan(r["rtf_cpu"]) else f"{r['rtf_cpu']:.3f}"
            print(
                f"{r['file']:<34} {backend:<13} {r['audio_s']:7.1f} {r['words']:5d} {r['errors']:6d} "
                f"{r['wer']:6.3f} {r['rtf_wall']:8.3f} {cpu:>7}"
            )
        words = sum(r["words"] for r in group)
        errors = sum(r["errors"] for r in group)
        audio = sum(r["audio_s"] for r in group)
        wall = sum(r["rtf_wall"] * r["audio_s"] for r in group) / audio
        cpus = [r["rtf_cpu"] * r["audio_s"] for r in group]
        cpu = "-" if any(np.isnan(cpus)) else f"{sum(cpus) / audio:.3f}"
        label = f"all files ({mode})"
        print(
            f"{label:<34} {backend:<13} {audio:7.1f} {words:5d} {errors:6d} {errors / words:6.3f} {wall:8.3f} {cpu:>7}"
        )
    print()
    for r in rows:
        print(f"[{r['backend']}] {r['file']}: {r['text']}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["pocketsphinx", "http"],
        default=None,
        help="default: pocketsphinx, plus http when --http-url is given",
    )
    parser.add_argument(
        "--http-url", help="an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8001/v1"
    )
    parser.add_argument("--http-model", default="whisper-1")
    parser.add_argument("--http-api-key", default=os.environ.get("TRANSCRIPTION_API_KEY"))
    parser.add_argument("--language", default="en")
    parser.add_argument("--files", nargs="+", default=FILES, choices=FILES)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["whole", "turns"],
        default=["whole", "turns"],
        help="whole: each file in one call; turns: cut at pauses of 0.5 s+, one call per turn",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    backends = args.backends or (["pocketsphinx"] + (["http"] if args.http_url else []))
    refs = json.loads((DATA / "transcripts.json").read_text())

    load = os.getloadavg()
    print(
        f"# {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
        f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; repeats {args.repeats} (median)"
    )
    rows: list[dict[str, Any]] = []
    for backend in backends:
        if backend == "pocketsphinx":
            from importlib.metadata import version

            settings = TranscriptionSettings(
                backend="pocketsphinx", language=args.language, timeout_s=args.timeout_s
            )
            label = "pocketsphinx"
            print(f"# pocketsphinx {version('pocketsphinx')}, packaged en-us model, 1 worker process")
        else:
            if not args.http_url:
                parser.error("--backends http needs --http-url")
            settings = TranscriptionSettings(
                backend="http",
                url=args.http_url,
                model=args.http_model,
                api_key=args.http_api_key,
                language=args.language,
                timeout_s=args.timeout_s,
            )
            label = "http"
            print(f"# http: {args.http_url} model {args.http_model}")
        rows += await run_backend(
            label, make_transcriber(settings), args.files, args.modes, refs, args.repeats
        )
    load = os.getloadavg()
    print(f"# load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print_table(rows)


if __name__ == "__main__":  # the pocketsphinx workers are spawned processes: they import this module
    asyncio.run(main())
