"""Start the server's VITA engines from settings: placement on GPUs or CPU cores, and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from models.engine import EngineSettings, VitaEngine

from .settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device_ids: str | None = None
    cpu_cores: str | None = None
    gpu_memory_utilization: float = 0.85


def use_gpu(settings: ServerSettings) -> bool:
    if settings.device != "auto":
        return settings.device == "cuda"
    import torch

    return torch.cuda.is_available()


def placements(settings: ServerSettings, on_gpu: bool) -> list[Placement]:
    """One placement per engine. Two engines on one GPU split its memory; on CPU each gets a core."""
    n = settings.engines
    if on_gpu:
        ids = settings.gpu_ids or [None] * n  # type: ignore[list-item]
        if len(ids) == 1 and n == 2:
            ids = ids * 2
        shared = n == 2 and ids[0] == ids[1]
        share = settings.gpu_memory_utilization / (2 if shared else 1)
        return [Placement(device_ids=ids[i], gpu_memory_utilization=share) for i in range(n)]
    cores = settings.cpu_cores or ([str(i) for i in range(n)] if n > 1 else [None])  # type: ignore[list-item]
    return [Placement(cpu_cores=cores[i % len(cores)]) for i in range(n)]


def engine_settings(settings: ServerSettings, model: str, placement: Placement, on_gpu: bool) -> EngineSettings:
    return EngineSettings(
        model=model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        enforce_eager=not on_gpu,
        device_ids=placement.device_ids,
        gpu_memory_utilization=placement.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        kv_cache_bytes=None if on_gpu else settings.kv_cache_mib << 20,
        cpu_cores=placement.cpu_cores,
    )


class EnginePool:
    """The engines every session shares (each session owns only its roles over them).

    A watchdog restarts an engine whose process died; meanwhile `ready` is false (so a load
    balancer stops routing here), and sessions whose requests failed got an error event and go on.
    """

    WATCH_INTERVAL_S = 0.5

    def __init__(self, settings: ServerSettings, model_dirs: list[str]) -> None:
        self.settings = settings
        self.model_dirs = model_dirs
        self.engines: list[VitaEngine] = []  # sessions hold this very list: slots are replaced in place
        self._settings: list[EngineSettings] = []
        self._ready = asyncio.Event()
        self._restarting: set[int] = set()
        self.restarts = 0

    async def start(self) -> None:
        on_gpu = use_gpu(self.settings)
        dirs = self.model_dirs if len(self.model_dirs) > 1 else self.model_dirs * self.settings.engines
        for model, placement in zip(dirs, placements(self.settings, on_gpu), strict=False):
            settings = engine_settings(self.settings, model, placement, on_gpu)
            self._settings.append(settings)
            self.engines.append(await VitaEngine.start(settings))
        self._ready.set()

    async def watch(self) -> None:
        """Restart dead engines, one at a time, for as long as the server runs."""
        while True:
            await asyncio.sleep(self.WATCH_INTERVAL_S)
            for index, engine in enumerate(list(self.engines)):
                if not engine.is_running and index not in self._restarting:
                    await self._restart(index)

    async def _restart(self, index: int) -> None:
        self._restarting.add(index)
        log.error("engine %d died; restarting it", index)
        try:
            with contextlib.suppress(Exception):
                await self.engines[index].shutdown()
            self.engines[index] = await VitaEngine.start(self._settings[index])
            self.restarts += 1
            log.info("engine %d restarted", index)
        finally:
            self._restarting.discard(index)

    @property
    def ready(self) -> bool:
        return (
            self._ready.is_set()
            and not self._restarting
            and bool(self.engines)
            and all(e.is_running for e in self.engines)
        )

    @property
    def model_id(self) -> str:
        return self.model_dirs[0].rstrip("/").split("/")[-1] if self.model_dirs else "vita"

    def requests_in_flight(self) -> int:
        return sum(e.num_unfinished() for e in self.engines)

    async def shutdown(self) -> None:
        for engine in self.engines:
            await engine.shutdown()
        self.engines.clear()
