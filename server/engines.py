"""Start the server's VITA engines from settings: placement on GPUs or CPU cores, and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

from models.engine import EngineSettings, VitaEngine

from .settings import ServerSettings

if TYPE_CHECKING:
    from duplex.tts_vita import VitaVoice
    from models.vita_tts.engine import VoiceSettings

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


class VoiceUnavailableError(RuntimeError):
    """tts=vita, and the served checkpoint has no vita_tts_ckpt/."""


def missing_voice(spec: str) -> str:
    return (
        f"tts=vita, but {spec} has no vita_tts_ckpt/ (decoder/ and codec/, each with model.json and final.pt, in "
        "the checkpoint folder or beside it): serve a VITA-1.5 checkpoint with its voice, or choose another voice "
        "(--tts auto, espeak, http or none)"
    )


def voice_settings(settings: ServerSettings, on_gpu: bool) -> VoiceSettings:
    """The vita voice's engine beside the LLM engines: on the first engine's GPU with its own memory share
    (bfloat16, CUDA graphs; its torch side, NAR and TiCodec, on that GPU too, outside the share), or on CPU
    with a small KV cap, eager, on `tts_cpu_cores` or the last engine's cores. One sentence at a time per
    session: as many sequences as sessions."""
    from models.vita_tts.engine import VoiceSettings

    place = placements(settings, on_gpu)
    if on_gpu:
        total = settings.gpu_memory_utilization + settings.tts_gpu_memory_utilization
        if total > 0.98:
            raise ValueError(
                f"gpu_memory_utilization {settings.gpu_memory_utilization:g} + tts_gpu_memory_utilization "
                f"{settings.tts_gpu_memory_utilization:g} = {total:g} of the first GPU: keep the sum at most 0.98"
            )
        ids = place[0].device_ids
        return VoiceSettings(tts_dir="", dtype="bfloat16", max_num_seqs=settings.max_sessions, device_ids=ids,
                             gpu_memory_utilization=settings.tts_gpu_memory_utilization,
                             torch_device=f"cuda:{ids.split(',')[0]}" if ids else "cuda")
    return VoiceSettings(tts_dir="", dtype="float32", max_num_seqs=settings.max_sessions, enforce_eager=True,
                         kv_cache_bytes=settings.tts_kv_cache_mib << 20,
                         cpu_cores=settings.tts_cpu_cores or place[-1].cpu_cores)


class EnginePool:
    """The engines every session shares (each session owns only its roles over them).

    A watchdog restarts an engine whose process died (about 30 s on CPU). Meanwhile the service is
    degraded, not down: the engines still serving take the dead one's role too (`routes`), as in the
    one-engine mode where both roles are concurrent requests on one engine, so `ready` stays true while
    any engine serves and `state` says "degraded". Requests that were on the dead engine fail with
    `EngineUnavailableError` (realtime: an `engine_unavailable` error event; chat: 503 + Retry-After).
    """

    WATCH_INTERVAL_S = 0.5
    RESTART_RETRY_AFTER_S = 30  # Retry-After while no engine serves: a CPU restart takes about this long

    def __init__(self, settings: ServerSettings, model_dirs: list[str]) -> None:
        self.settings = settings
        self.model_dirs = model_dirs
        self.engines: list[VitaEngine] = []  # slots are replaced in place when an engine restarts
        self.routes = EngineRoutes(self)  # what sessions hold: slot i, or a serving engine while i is down
        self._settings: list[EngineSettings] = []
        self._ready = asyncio.Event()
        self._restarting: set[int] = set()
        self.restarts = 0
        self.on_restart: Callable[[], None] | None = None  # metrics count restarts
        self.voice: VitaVoice | None = None  # the vita voice's one engine, shared by every session (tts auto/vita)

    async def start(self) -> None:
        on_gpu = use_gpu(self.settings)
        dirs = self.model_dirs if len(self.model_dirs) > 1 else self.model_dirs * self.settings.engines
        for model, placement in zip(dirs, placements(self.settings, on_gpu), strict=False):
            settings = engine_settings(self.settings, model, placement, on_gpu)
            self._settings.append(settings)
            self.engines.append(await VitaEngine.start(settings))
        await self._start_voice(on_gpu)
        self._ready.set()

    async def _start_voice(self, on_gpu: bool) -> None:
        """The vita voice, when `tts` is auto (and the checkpoint ships it) or vita (which requires it)."""
        if self.settings.tts not in ("auto", "vita") or not self.model_dirs:
            return
        from duplex.tts_vita import VitaVoice, has_vita_voice
        from models.checkpoint import resolve_model_dir

        spec = self.model_dirs[0]  # the generator's checkpoint: its embedding table feeds the decoder
        model_dir = await asyncio.to_thread(resolve_model_dir, spec)
        if not has_vita_voice(model_dir):
            if self.settings.tts == "vita":
                raise VoiceUnavailableError(missing_voice(spec))
            log.info("%s has no vita_tts_ckpt/: speech out uses espeak (tts auto)", spec)
            return
        settings = voice_settings(self.settings, on_gpu)
        if not on_gpu:
            # The voice's torch side (NAR, TiCodec) runs in this process, beside the event loop: one intra-op
            # thread, so its OpenMP workers do not take the core the loop (and a barge-in's abort) needs.
            import torch

            torch.set_num_threads(1)
        self.voice = await VitaVoice.start(model_dir, settings, tokenizer=self.engines[0].tokenizer)
        if on_gpu:
            where = f"GPU {settings.device_ids or 'default'}, {settings.gpu_memory_utilization:g} of its memory"
        else:
            where = f"CPU cores {settings.cpu_cores or 'any'}, KV cache {(settings.kv_cache_bytes or 0) >> 20} MiB"
        log.info("vita voice ready: %s (%s); every session speaks through its one engine", model_dir, where)

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
            if self.on_restart is not None:
                self.on_restart()
            log.info("engine %d restarted", index)
        finally:
            self._restarting.discard(index)

    def serving(self, index: int) -> bool:
        """Slot `index` has a live engine that takes requests (not dead, not being restarted)."""
        return index not in self._restarting and self.engines[index].is_running

    def serving_engines(self) -> list[VitaEngine]:
        return [e for i, e in enumerate(self.engines) if self.serving(i)]

    @property
    def ready(self) -> bool:
        """Requests can be served: started, and at least one engine serving (all of them, or degraded)."""
        return self._ready.is_set() and any(self.serving(i) for i in range(len(self.engines)))

    @property
    def degraded(self) -> bool:
        """Ready, but some engine is down: the others serve its role until it is back."""
        return self.ready and not all(self.serving(i) for i in range(len(self.engines)))

    @property
    def state(self) -> str:
        """"loading", "ready", "degraded" (an engine restarts, others serve) or "restarting" (none serves)."""
        if not self._ready.is_set():
            return "loading"
        return "degraded" if self.degraded else "ready" if self.ready else "restarting"

    def retry_after_s(self) -> int:
        """For a request lost with its engine: at once where another engine serves, else after a restart."""
        return 1 if self.ready else self.RESTART_RETRY_AFTER_S

    @property
    def model_id(self) -> str:
        return self.model_dirs[0].rstrip("/").split("/")[-1] if self.model_dirs else "vita"

    def requests_in_flight(self) -> int:
        return sum(e.num_unfinished() for e in self.engines)

    def voice_requests_in_flight(self) -> int:
        """Unfinished speech-decoder requests in the vita voice's engine (0 without the voice)."""
        return self.voice.engine.num_unfinished() if self.voice is not None else 0

    async def shutdown(self) -> None:
        voice, self.voice = self.voice, None
        if voice is not None:
            await voice.shutdown()
        for engine in self.engines:
            await engine.shutdown()
        self.engines.clear()


class EngineRoutes(Sequence[VitaEngine]):
    """The engines as sessions see them: slot `i` is engine `i` while it serves, else the least busy
    engine that does. A session's generator and monitor roles thus land on one engine while the other
    restarts, and go back to their own slots once it is up (each request keeps the engine it went to)."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def __len__(self) -> int:
        return len(self._pool.engines)

    @overload
    def __getitem__(self, index: int) -> VitaEngine: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[VitaEngine]: ...
    def __getitem__(self, index: int | slice) -> VitaEngine | Sequence[VitaEngine]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        pool = self._pool
        engine = pool.engines[index]
        if pool.serving(index % len(pool.engines)):
            return engine
        others = pool.serving_engines()
        # None serves: the slot's own engine, whose request then fails with EngineUnavailableError.
        return min(others, key=lambda e: e.num_unfinished()) if others else engine
