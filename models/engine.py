"""One VITA engine: vLLM's AsyncLLM with streamed deltas, abort, and per-engine placement.

`generate` streams token ids and text deltas; `abort` stops a request at once (the stream then ends
with reason "abort"). Placement: on GPUs, which devices, memory share and tensor parallelism; on
CPU, a KV-cache cap and the cores this engine's worker is pinned to, so two engines in one process
do not fight over one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .config import VitaConfig, register_config, state_tokens_of
from .errors import EngineUnavailableError, PromptTooLongError
from .prompts import PromptBuilder

log = logging.getLogger(__name__)

# Env vars are read by vLLM's spawned engine process at start, so two engines started at the same
# time must not see each other's values.
_ENV_LOCK = asyncio.Lock()

# vLLM's refusal of a prompt over max_model_len by its input processor ("The decoder prompt (length 5000) is
# longer than the maximum model length of 4096", or "... plus the number of requested output tokens ...
# maximum model length of N"); its renderer's says parameter="input_tokens" with the count as the value.
_TOO_LONG = re.compile(r"prompt \(length (\d+)\).*maximum model length of (\d+)", re.DOTALL)


@dataclass(frozen=True)
class EngineSettings:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the text model's own limit
    max_num_seqs: int = 32
    enforce_eager: bool = False
    seed: int = 0
    # GPU placement
    device_ids: str | None = None  # CUDA_VISIBLE_DEVICES for this engine, e.g. "0" or "2,3"
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    # CPU placement
    kv_cache_bytes: int | None = None  # required on CPU: vLLM otherwise takes most of the RAM
    cpu_cores: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0-3"
    # oneDNN keeps a compiled kernel per matmul shape, 1024 by default; every prompt length is a new
    # shape, so a CPU worker grows by ~250 MiB until that cache is full. 64 keeps the decode shapes
    # (one per batch size and weight shape) and bounds the rest. An ONEDNN_PRIMITIVE_CACHE_CAPACITY
    # set in the environment wins; None leaves oneDNN's default.
    onednn_cache_capacity: int | None = 64
    limit_images: int = 16
    limit_audios: int = 4
    enable_prefix_caching: bool = True
    # vLLM's processed-media cache (its default: 4 GiB per engine, held twice: front end and engine
    # core). Live turns are always new audio, history keeps no images, and the history audio that
    # does come back is served to both engines by `models.feature_cache`: off by default.
    mm_cache_gb: float = 0.0


@dataclass(frozen=True)
class EngineInput:
    """A prompt as ids (one placeholder per item) plus its media, in placeholder order."""

    token_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)  # 16 kHz mono float32
    max_dynamic_patch: int | None = None

    def to_vllm(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": list(self.token_ids)}
        media: dict[str, Any] = {}
        if self.images:
            media["image"] = list(self.images)
        if self.audios:
            media["audio"] = [np.asarray(a, dtype=np.float32) for a in self.audios]
        if media:
            prompt["multi_modal_data"] = media
        if self.max_dynamic_patch is not None:
            prompt["mm_processor_kwargs"] = {"max_dynamic_patch": self.max_dynamic_patch}
        return prompt


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.0  # the VITA demos use 0.001: greedy
    top_p: float = 1.0
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (used to check the model)


@dataclass(frozen=True)
class Delta:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    logprobs: tuple[dict[int, float], ...] | None = None
    num_prompt_tokens: int | None = None  # on the first delta: the prompt after media expansion


class AsyncLLMRequests:
    """Request bookkeeping shared by every engine that owns a vLLM `AsyncLLM` in `self._llm` (None once shut down)."""

    _llm: Any

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self._llm.errored:
            await self._llm.abort(request_id)

    def num_unfinished(self) -> int:
        if self._llm is None:
            return 0
        return int(self._llm.output_processor.get_num_unfinished_requests())


class VitaEngine(AsyncLLMRequests):
    """A started engine. Create with `await VitaEngine.start(settings)`; close with `shutdown()`."""

    def __init__(self, llm: Any, settings: EngineSettings, config: VitaConfig, tokenizer: Any) -> None:
        self._llm = llm
        self.settings = settings
        self.config = config
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, config)
        self.state_tokens = state_tokens_of(config)

    @classmethod
    async def start(cls, settings: EngineSettings) -> VitaEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from .checkpoint import CheckpointError, check_tensors, open_checkpoint
        from .plugin import VITA_CONFIG_FORMAT

        register_config()
        # A directory or a hub id, in any published config format (downloads, if any, happen here).
        ckpt = await asyncio.to_thread(open_checkpoint, settings.model)
        ckpt.log_sources(log)
        check = check_tensors(ckpt)
        if not check.ok:
            raise CheckpointError(
                f"{settings.model}: the tensors do not match the VITA layout of its config: "
                f"{'; '.join(check.describe(5))} (`vita-duplex inspect {settings.model}` lists them all)")
        config, tokenizer = ckpt.config, ckpt.tokenizer
        if ckpt.config_format == "text":
            # A plain text LLM (no towers): vLLM serves it with its own architecture and config; only the
            # prompts are VITA's (ChatML), and its input is text (speech through transcripts).
            media: dict[str, Any] = {}
        else:
            media = {
                "config_format": VITA_CONFIG_FORMAT,  # models.checkpoint converts the config in the engine too
                "limit_mm_per_prompt": {"image": settings.limit_images, "audio": settings.limit_audios},
                "mm_processor_cache_gb": settings.mm_cache_gb,
            }
        args = AsyncEngineArgs(
            model=str(ckpt.path),
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            kv_cache_memory_bytes=settings.kv_cache_bytes,
            enable_prefix_caching=settings.enable_prefix_caching,
            **media,
        )
        async with _ENV_LOCK:
            with _placement_env(settings):
                # Building the engine blocks for tens of seconds: keep the event loop answering
                # (health checks, other sessions) meanwhile. Its output loop starts lazily on first use.
                llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        log.info("engine ready: %s (devices=%s cores=%s)", settings.model, settings.device_ids, settings.cpu_cores)
        return cls(llm, settings, config, tokenizer)

    async def generate(
        self, prompt: EngineInput, request_id: str | None = None, sampling: Sampling = Sampling()
    ) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._llm
        if llm is None or llm.errored:
            raise EngineUnavailableError("this engine has stopped; the server is restarting it")
        limit = int(llm.model_config.max_model_len)
        if len(prompt.token_ids) >= limit:  # before any media is processed: text alone is already too long
            raise PromptTooLongError(len(prompt.token_ids), limit)
        request_id = request_id or uuid.uuid4().hex
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            ignore_eos=sampling.ignore_eos,
            skip_special_tokens=True,
            logprobs=sampling.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        first = True
        try:
            async for output in llm.generate(prompt.to_vllm(), params, request_id=request_id):
                completion = output.outputs[0]
                prompt_tokens = len(output.prompt_token_ids or ()) if first else None
                first = False
                yield Delta(
                    request_id=request_id,
                    token_ids=tuple(completion.token_ids),
                    text=completion.text,
                    finish_reason=completion.finish_reason if output.finished else None,
                    logprobs=_logprob_dicts(completion.logprobs),
                    num_prompt_tokens=prompt_tokens,
                )
        except EngineDeadError as exc:
            raise EngineUnavailableError(
                "the engine serving this request stopped; the server is restarting it"
            ) from exc
        except VLLMValidationError as exc:
            # With media the expanded length is only known to vLLM, which says it one of two ways.
            if exc.parameter == "input_tokens" and isinstance(exc.value, int):
                raise PromptTooLongError(exc.value, limit) from exc
            too_long = _TOO_LONG.search(str(exc))
            if too_long is None:
                raise
            raise PromptTooLongError(int(too_long[1]), int(too_long[2])) from exc

    @property
    def is_running(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        llm.shutdown()
        # AsyncLLM.__del__ shuts down again; if something still holds the object at interpreter exit,
        # that second shutdown runs on torn-down modules and prints a TypeError. It is done: make it a no-op.
        llm.shutdown = lambda *args, **kwargs: None  # type: ignore[method-assign]
        del llm
        gc.collect()


def _logprob_dicts(logprobs: Any) -> tuple[dict[int, float], ...] | None:
    if logprobs is None:
        return None
    return tuple({int(tok): float(lp.logprob) for tok, lp in position.items()} for position in logprobs)


@contextlib.contextmanager
def _placement_env(settings: EngineSettings) -> Iterator[None]:
    values = {
        "CUDA_VISIBLE_DEVICES": settings.device_ids,
        "VLLM_CPU_OMP_THREADS_BIND": settings.cpu_cores,
        "HF_HUB_OFFLINE": "1",  # weights come from the model directory, never from a hub
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": os.environ.get(
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
            None if settings.onednn_cache_capacity is None else str(settings.onednn_cache_capacity),
        ),
    }
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
