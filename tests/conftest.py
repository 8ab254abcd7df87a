"""Shared fixtures: tiny checkpoints built once per test session, and real vLLM engines shared by tests.

Each vLLM engine costs ~15-30 s to start on 2 CPU cores, so every test of a module shares its
engines (module scope: ~2 GB each is freed when the module is done), and one server process serves
all server tests. Engines cap their KV cache and run eager, as required on CPU.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from server.process import ServerProcess as _ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

DATA = Path(__file__).parent / "data"


def cpu_engine_settings(model: Path, cores: str | None = None, **overrides: object):
    from models.engine import EngineSettings

    values: dict[str, object] = {
        "model": str(model),
        "dtype": "float32",
        "enforce_eager": True,
        "kv_cache_bytes": 64 << 20,
        "max_model_len": 4096,
        "max_num_seqs": 8,
        "limit_images": 4,
        "limit_audios": 2,
        "cpu_cores": cores,
    }
    values.update(overrides)
    return EngineSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {layout: build_tiny(layout, root / layout) for layout in ("vita15", "vita10")}


@pytest_asyncio.fixture(scope="module")
async def engines(tiny_dirs: dict[str, Path]) -> AsyncIterator[dict[str, object]]:
    """One engine per layout, each pinned to its own core: together they are 'two engines in one process'."""
    from models.engine import VitaEngine

    started = {
        "vita15": await VitaEngine.start(cpu_engine_settings(tiny_dirs["vita15"], cores="0")),
        "vita10": await VitaEngine.start(cpu_engine_settings(tiny_dirs["vita10"], cores="1")),
    }
    yield started
    for engine in started.values():
        await engine.shutdown()


@pytest.fixture(scope="session")
def references(tiny_dirs: dict[str, Path]) -> dict[str, object]:
    from models.reference import ReferenceVita

    return {layout: ReferenceVita(path) for layout, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def forced_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny VITA-1.5 checkpoints whose first generated token is always ☞ (query) or ☟ (noise)."""
    from models.tiny import build_tiny

    root = tmp_path_factory.mktemp("forced")
    return {kind: build_tiny("vita15", root / kind, seed=3, force=kind) for kind in ("query", "noise")}


@pytest_asyncio.fixture(scope="module")
async def forced_engines(forced_dirs: dict[str, Path]) -> AsyncIterator[dict[str, object]]:
    from models.engine import VitaEngine

    started = {
        "query": await VitaEngine.start(cpu_engine_settings(forced_dirs["query"], cores="0")),
        "noise": await VitaEngine.start(cpu_engine_settings(forced_dirs["noise"], cores="1")),
    }
    yield started
    for engine in started.values():
        await engine.shutdown()


API_KEY = "test-key-123"


class ServerProcess(_ServerProcess):
    """server/process.py's helper with the tests' defaults: both cores for the engines, 48-token answers."""

    def __init__(self, model: Path | None, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(model, log_dir, *args, env={"VITA_CPU_CORES": "0,1", "VITA_MAX_TOKENS": "48", **(env or {})})


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny VITA-1.5 whose first token is ☞ (query) and whose answers always run to max_tokens. Without the
    vita voice (`tts=False`): servers of it speak with espeak under the default `tts: auto`, and start two
    engines, not three (tests/test_vita_voice_server.py serves one with its voice)."""
    from models.tiny import build_tiny

    return build_tiny("vita15", tmp_path_factory.mktemp("served") / "query", seed=5, force="query", never_stop=True,
                      tts=False)


@pytest.fixture(scope="session")
def server(served_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The shared server for server tests: an API key, espeak speech, at most 4 sessions, 48 tokens."""
    proc = ServerProcess(served_model, tmp_path_factory.mktemp("server-log"), "--api-key", API_KEY,
                         "--max-sessions", "4")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server_url(server: ServerProcess) -> str:
    return server.url
