"""The vita voice engine: NAR + AR-prompt pass in torch, AR decoding in vLLM (one engine, all sessions batched),
TiCodec decoding in torch (windows of equal length from concurrent sessions decoded in one batch).

    engine = await VoiceEngine.start(VoiceSettings(tts_dir=..., kv_cache_bytes=..., enforce_eager=True))
    async for pcm in engine.speak(vectors, request_id, FIRST_SENTENCE):   # float32 24 kHz pieces
        ...
    await engine.abort(request_id)  # or leave the loop: the generator's cleanup aborts the request in vLLM

`speak` takes the decoder's input vectors (text embedding rows cut to `idim`, see `TextEmbedder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import AsyncLLMRequests
from .config import TTSCheckpoint, open_tts_checkpoint
from .reference import ReferenceCodec, ReferenceDecoder
from .streaming import CodecWindow, SentenceStream, StreamParams
from .weights import map_codec_names, map_decoder_names, safe_load

log = logging.getLogger(__name__)

UPSTREAM_MAX_TOKENS = 1000  # upstream `infer(max_tokens=1000)`: 25 s of speech per sentence
UPSTREAM_TOP_K = 2


@dataclass(frozen=True)
class VoiceSettings:
    tts_dir: str
    dtype: str = "float32"  # "bfloat16" on GPU, as upstream's autocast
    max_num_seqs: int = 64  # sessions speaking at once
    enforce_eager: bool = False
    seed: int = 0
    # GPU placement (beside the LLM engines): its own memory share
    device_ids: str | None = None
    gpu_memory_utilization: float = 0.05
    # CPU placement
    kv_cache_bytes: int | None = None
    cpu_cores: str | None = None
    max_tokens: int = UPSTREAM_MAX_TOKENS
    top_k: int = UPSTREAM_TOP_K
    logprobs_mode: str | None = None  # "raw_logits" lets tests read the decoder's logits
    max_logprobs: int = 20
    work_dir: str | None = None  # where the engine directory (config.json + safetensors) is written
    # Where the torch side runs (NAR, the AR prompt pass, TiCodec): "cpu", or "cuda:N" beside the engine on a GPU
    # (in `dtype` there; at real size TiCodec on a CPU is slower than real time).
    torch_device: str = "cpu"


@dataclass
class SpeechStats:
    """Per-request timings (perf_counter seconds) and counts, for benchmarks and logs."""

    started: float = 0.0
    first_audio: float | None = None
    tokens: int = 0
    samples: int = 0
    token_ids: list[int] = field(default_factory=list)


class CodecBatcher:
    """Decodes codec windows; windows of the same length waiting at the same time go through in one batch."""

    def __init__(self, codec: ReferenceCodec, device: torch.device | None = None) -> None:
        self.codec = codec
        self.device = device or torch.device("cpu")
        self._pending: list[tuple[tuple[int, ...], asyncio.Future[torch.Tensor]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def decode(self, tokens: tuple[int, ...]) -> torch.Tensor:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._pending.append((tokens, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            groups: dict[int, list[tuple[tuple[int, ...], asyncio.Future[torch.Tensor]]]] = {}
            for item in batch:
                if not item[1].cancelled():
                    groups.setdefault(len(item[0]), []).append(item)
            for items in groups.values():
                codes = torch.tensor([t for t, _ in items], dtype=torch.long)
                try:
                    audio = await asyncio.to_thread(self._decode, codes)
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    for _, fut in items:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for row, (_, fut) in enumerate(items):
                    if not fut.done():
                        fut.set_result(audio[row, 0])

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        with torch.device(self.device):
            return self.codec.decode(codes.to(self.device)).to(device="cpu", dtype=torch.float32)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class VoiceEngine(AsyncLLMRequests):
    def __init__(
        self,
        llm: Any,
        settings: VoiceSettings,
        ckpt: TTSCheckpoint,
        decoder: ReferenceDecoder,
        codec: ReferenceCodec,
        work_dir: Any,
    ) -> None:
        self._llm = llm
        self.settings = settings
        self.ckpt = ckpt
        self.decoder = decoder
        self.codec = codec
        self.device = torch.device(settings.torch_device)
        self.codec_batcher = CodecBatcher(codec, self.device)
        self._work_dir = work_dir  # a TemporaryDirectory kept alive with the engine, or a path
        self.sample_rate = ckpt.codec.sampling_rate
        self.samples_per_token = ckpt.codec.samples_per_token

    @classmethod
    async def start(cls, settings: VoiceSettings) -> VoiceEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ..engine import _ENV_LOCK, EngineSettings, _placement_env
        from .vllm_decoder import write_engine_dir

        ckpt = await asyncio.to_thread(open_tts_checkpoint, settings.tts_dir)
        weights = await asyncio.to_thread(lambda: map_decoder_names(safe_load(ckpt.decoder_weights)))
        device = torch.device(settings.torch_device)
        torch_dtype = torch.float32 if device.type == "cpu" else _torch_dtype(settings.dtype)
        decoder = ReferenceDecoder(ckpt.decoder, {k: v.to(device) for k, v in weights.items()}, torch_dtype)
        codec_weights = await asyncio.to_thread(lambda: map_codec_names(safe_load(ckpt.codec_weights)))
        codec = ReferenceCodec(ckpt.codec, {k: v.to(device) for k, v in codec_weights.items()}, torch_dtype)
        holder: Any = None
        if settings.work_dir is None:
            holder = tempfile.TemporaryDirectory(prefix="vita-tts-")
            engine_dir = Path(holder.name)
        else:
            engine_dir = Path(settings.work_dir)
        dtype = "float32" if settings.dtype == "auto" else settings.dtype
        await asyncio.to_thread(write_engine_dir, ckpt.decoder, weights, engine_dir, dtype)
        extra: dict[str, Any] = {}
        if settings.logprobs_mode is not None:
            extra["logprobs_mode"] = settings.logprobs_mode
        args = AsyncEngineArgs(
            model=str(engine_dir),
            skip_tokenizer_init=True,
            enable_prompt_embeds=True,
            dtype=dtype,
            max_model_len=ckpt.decoder.max_position_embeddings,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_memory_bytes=settings.kv_cache_bytes,
            enable_prefix_caching=False,  # every prompt is a new sentence
            generation_config="vllm",
            max_logprobs=settings.max_logprobs,
            **extra,
        )
        placement = EngineSettings(
            model=str(engine_dir), device_ids=settings.device_ids, cpu_cores=settings.cpu_cores
        )
        async with _ENV_LOCK:
            with _placement_env(placement):
                llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        log.info("vita voice engine ready: %s", ckpt.root)
        return cls(llm, settings, ckpt, decoder, codec, holder or engine_dir)

    # --- the torch front: NAR + the AR prompt's per-layer inputs ----------------------------------

    def prompt_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        from .vllm_decoder import prompt_carrier

        with torch.device(self.device):  # the reference makes its position/token tensors on the default device
            layer_inputs = self.decoder.prompt_layer_inputs(vectors.to(self.device))
            sos = self.decoder.embed(torch.tensor([self.ckpt.decoder.sos_id]))[0]
            rows = prompt_carrier(layer_inputs, sos)
        return rows.to(device="cpu", dtype=_torch_dtype(self.settings.dtype))  # vLLM takes prompt embeds on the host

    # --- AR decoding in vLLM ------------------------------------------------------------------------

    async def tokens(
        self,
        vectors: torch.Tensor,
        request_id: str,
        max_tokens: int | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
    ) -> AsyncIterator[tuple[list[int], Any]]:
        """Codec token deltas (and their logprobs when asked) from vLLM. Leaving the loop aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        embeds = await asyncio.to_thread(self.prompt_embeds, vectors)
        cfg = self.ckpt.decoder
        room = cfg.max_position_embeddings - embeds.shape[0]  # upstream's RoPE table: 2048 positions in all
        if room < 1:
            raise ValueError(
                f"sentence too long for the speech decoder: {vectors.shape[0]} input vectors; at most "
                f"{cfg.max_position_embeddings - 2} fit its {cfg.max_position_embeddings} positions"
            )
        params = SamplingParams(
            max_tokens=min(max_tokens or self.settings.max_tokens, room),
            temperature=1.0,
            top_k=self.settings.top_k,
            stop_token_ids=[cfg.eos_id],
            detokenize=False,
            seed=seed,
            logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        finished = False
        try:
            async for output in self._llm.generate({"prompt_embeds": embeds}, params, request_id=request_id):
                completion = output.outputs[0]
                ids = [t for t in completion.token_ids if t != cfg.eos_id]
                finished = output.finished
                yield ids, completion.logprobs
        finally:
            if not finished and self._llm is not None and not self._llm.errored:
                await self._llm.abort(request_id)

    async def speak(
        self,
        vectors: torch.Tensor,
        request_id: str | None = None,
        params: StreamParams | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stats: SpeechStats | None = None,
    ) -> AsyncIterator[np.ndarray]:
        """One sentence: float32 pieces at 24 kHz as upstream streams them (chunks cut at quiet points)."""
        from .streaming import LATER_SENTENCE

        request_id = request_id or uuid.uuid4().hex
        stream = SentenceStream(params or LATER_SENTENCE)
        stats = stats if stats is not None else SpeechStats()
        stats.started = time.perf_counter()
        async with contextlib.aclosing(self.tokens(vectors, request_id, max_tokens, seed)) as deltas:
            async for ids, _ in deltas:
                stats.tokens += len(ids)
                stats.token_ids.extend(ids)
                for token in ids:
                    window = stream.windows.push(token)
                    if window is not None:
                        piece = await self._decode(stream, window)
                        if piece is not None:
                            yield self._emit(piece, stats)
        window = stream.windows.finish()
        if window is not None:
            piece = await self._decode(stream, window)
            if piece is not None and piece.numel():
                yield self._emit(piece, stats)

    async def _decode(self, stream: SentenceStream, window: CodecWindow) -> torch.Tensor | None:
        audio = await self.codec_batcher.decode(window.tokens)
        return stream.decoded(window, audio)

    @staticmethod
    def _emit(piece: torch.Tensor, stats: SpeechStats) -> np.ndarray:
        if stats.first_audio is None:
            stats.first_audio = time.perf_counter()
        stats.samples += piece.numel()
        return piece.to(torch.float32).numpy().astype(np.float32, copy=False)

    async def shutdown(self) -> None:
        self.codec_batcher.close()
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            llm.shutdown = lambda *args, **kwargs: None  # see models.engine.VitaEngine.shutdown
        if isinstance(self._work_dir, tempfile.TemporaryDirectory):
            self._work_dir.cleanup()


def _torch_dtype(name: str) -> torch.dtype:
    return {
        "float32": torch.float32,
        "auto": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]


# --- the text side: LLM input-embedding rows for a sentence --------------------------------------------


def prepare_text(text: str, first: bool) -> str:
    """Upstream's web-demo text preparation: VITA's state/special tokens removed, lower case, and in a response's
    first sentence commas become full stops (its `$$FIRST_SENTENCE_MARK$$` rule). Its `replace_equation` (sin ->
    " sine ", "+" -> "加", ...) is left out: it rewrites inside words ("cost" -> "cosinet")."""
    from ..state_tokens import strip_special_tokens

    text = strip_special_tokens(text)
    if first:
        text = text.replace("，", "。").replace(",", "。")
    return text.lower().strip()


class TextEmbedder:
    """Tokenizer + the LLM's input-embedding table, read row by row from the safetensors (memory-mapped): the
    7B model's 152064 x 3584 table is never loaded whole. `vectors(text)` is upstream's
    `embedding(tokenizer.encode(text)).reshape(-1, idim)`."""

    NAMES = ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight")

    def __init__(self, model_dir: str | Path, idim: int, tokenizer: Any = None) -> None:
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        self.idim = idim
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.tokenizer = tokenizer
        self._slice: Any = None
        for path in sorted(self.model_dir.glob("*.safetensors")):
            handle = safe_open(str(path), framework="pt")
            for name in self.NAMES:
                if name in handle.keys():  # noqa: SIM118 - safe_open handles are not containers
                    self._handle, self._slice = handle, handle.get_slice(name)
                    break
            if self._slice is not None:
                break
        if self._slice is None:
            raise FileNotFoundError(f"{model_dir}: no safetensors file holds {' or '.join(self.NAMES)}")

    def rows(self, ids: list[int]) -> torch.Tensor:
        return torch.cat([self._slice[i : i + 1] for i in ids]).to(torch.float32)

    def vectors(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text)
        if not ids:
            return torch.zeros(0, self.idim)
        rows = self.rows(list(ids))
        if rows.shape[-1] % self.idim:
            raise ValueError(
                f"LLM hidden size {rows.shape[-1]} is not a multiple of the speech decoder's idim {self.idim}"
            )
        return rows.reshape(-1, self.idim)


def iter_windows(tokens: list[int], params: StreamParams) -> Iterator[CodecWindow]:
    """All windows of a finished token list (tests and offline synthesis)."""
    from .streaming import TokenWindows

    windows = TokenWindows(params)
    for t in tokens:
        w = windows.push(t)
        if w is not None:
            yield w
    last = windows.finish()
    if last is not None:
        yield last
