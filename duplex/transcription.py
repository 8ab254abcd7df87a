"""Input transcription: what the user said, as text, for OpenAI Realtime's transcription events.

VITA does not transcribe, so a session that asks for ``audio.input.transcription`` gets it from one of
these backends, chosen by `TranscriptionSettings.backend` (in the style of the TTS backends in
`duplex.tts` / `duplex.tts_http`):

* ``pocketsphinx`` (`PocketsphinxTranscriber`): CMU's official ``pocketsphinx`` package (BSD), which
  ships its en-US acoustic model, language model and dictionary in the wheel, so it works offline with
  nothing downloaded at run time and no torch. It is the only legitimately published ASR-with-weights on
  PyPI that we found. It is *weak* (its maintainer calls it "very, very far from the state of the art"):
  see ``bench/RESULTS.md`` for its word error rate on real recordings. English only.
* ``http`` (`OpenAITranscriptionClient`): any OpenAI-compatible ``POST /v1/audio/transcriptions`` server
  (vLLM serving Whisper, speaches, faster-whisper-server, OpenAI itself). This is the backend to use for
  good transcripts: put a Whisper beside the GPU.
* ``none`` (`NoTranscription`): transcription off; asking it to transcribe is an error.

Every backend has the same interface (`Transcriber`): ``await transcribe(samples_16k) -> Transcript``,
and ``transcribe_stream(samples_16k)``, an async iterator of `TranscriptDelta` pieces of text ending with
the final `Transcript`. `transcription_events` wraps the stream so that it never raises (except on
cancellation): failures come out as one `TranscriptionFailure`. The three event types map one to one
onto GA's ``conversation.item.input_audio_transcription.delta`` / ``.completed`` / ``.failed``.

`SessionTranscripts` holds one session's transcriptions, one per clip of user speech, shared by the
server's transcription events for an item and by a model that hears through transcripts (`duplex.runtime`:
a model without a trained audio tower gets each segment's transcript as the user's text, and
`is_noise_transcript` decides when a segment is noise). This module knows nothing of WebSockets or JSON
events: the server decides when to ask (once per committed user audio item) and turns what comes out
into wire events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import time
import wave
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000
Backend = Literal["pocketsphinx", "http", "none"]
BACKENDS: tuple[str, ...] = ("pocketsphinx", "http", "none")

POCKETSPHINX_MISSING = (
    "the pocketsphinx transcription backend needs the pocketsphinx package (a core dependency of vita-duplex: "
    "pip install pocketsphinx); or set the transcription backend to 'http' or 'none'"
)

log = logging.getLogger(__name__)


class TranscriptionError(RuntimeError):
    """A transcription that did not happen. ``code`` is a short machine-readable reason, for the
    ``error.code`` of GA's ``conversation.item.input_audio_transcription.failed``:

    ``unavailable`` (backend not installed / not configured), ``disabled`` (backend ``none``),
    ``unsupported_language``, ``bad_audio``, ``timeout``, ``connection_error``, ``server_error``
    (non-200 answer), ``bad_response`` (200 but not a transcription), ``backend_crashed``."""

    def __init__(self, message: str, code: str = "transcription_failed") -> None:
        super().__init__(message)
        self.code = code


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptionSettings:
    """What `make_transcriber` builds. The server maps its own settings (``transcription_*``) onto this.

    * ``backend``: ``pocketsphinx`` (offline, weak, English), ``http`` (an OpenAI-compatible server) or
      ``none``.
    * ``url``: the http backend's base URL (``http://host:8000/v1`` or ``http://host:8000``; a URL that
      already ends in ``/audio/transcriptions`` is used as is).
    * ``model``: the ``model`` form field sent to the http server (e.g. ``openai/whisper-large-v3`` for
      vLLM, ``Systran/faster-whisper-small`` for speaches, ``whisper-1`` for OpenAI).
    * ``api_key``: sent as ``Authorization: Bearer ...`` when set; never shown in repr or messages.
    * ``language``: ISO-639-1 default language (``en``); a session may override it per call. None: the
      http server detects it. pocketsphinx only has an English model and refuses any other language.
    * ``max_concurrency``: at most this many transcriptions run at once per server; more wait in line.
      For pocketsphinx it is the number of worker processes (each holds its own decoder, ~130 MB
      resident, and uses one core while it works); its default, 1, keeps it from taking more than one
      of the cores the engines need. For http it bounds the requests in flight; default 8 (the
      transcription server batches them).
    * ``timeout_s``: the whole transcription (waiting in line included) must finish within this, or it
      fails with code ``timeout``.
    * ``stream``: http only: ask the server for ``stream=true`` and pass its text deltas on as they come
      (vLLM, OpenAI and speaches stream; a server that ignores the flag and answers JSON still works).
    * ``worker_nice``: pocketsphinx only: the worker processes lower their CPU priority by this much
      (``os.nice``), so that on a small CPU machine the engines answering the user win over the
      transcript. 0 leaves the priority alone.
    """

    backend: Backend = "none"
    url: str | None = None
    model: str = "whisper-1"
    api_key: str | None = field(default=None, repr=False)
    language: str | None = None
    max_concurrency: int | None = None  # None: 1 for pocketsphinx, 8 for http
    timeout_s: float = 60.0
    stream: bool = False
    worker_nice: int = 10

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"transcription backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}"
            )
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"transcription max_concurrency must be at least 1; got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"transcription timeout_s must be positive; got {self.timeout_s}")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"transcription worker_nice must be 0..19; got {self.worker_nice}")
        if self.backend == "http" and not self.url:
            raise ValueError(
                "the http transcription backend needs a url: an OpenAI-compatible server's base URL, "
                "e.g. http://127.0.0.1:8001/v1"
            )


# --- results and events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transcript:
    """A finished transcription. ``audio_s`` is the audio's length (GA's ``usage`` of type
    ``duration``); ``elapsed_s`` the wall time the backend took, waiting in line included."""

    text: str
    backend: str
    model: str
    language: str | None
    audio_s: float
    elapsed_s: float

    @property
    def real_time_factor(self) -> float:
        """Wall time per second of audio (below 1: faster than real time)."""
        return self.elapsed_s / self.audio_s if self.audio_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TranscriptDelta:
    """A piece of text to append to the transcript shown so far (GA ``...transcription.delta``).
    The final `Transcript`'s text is authoritative: deltas are for display while it is being made."""

    text: str


@dataclass(frozen=True, slots=True)
class TranscriptionFailure:
    """A transcription that failed (GA ``...transcription.failed``); ``code`` as `TranscriptionError`."""

    code: str
    message: str


TranscriptionEvent = TranscriptDelta | Transcript | TranscriptionFailure


# --- the interface ---------------------------------------------------------------------------------


@runtime_checkable
class Transcriber(Protocol):
    """A speech-to-text backend. One instance serves every session of a server (it holds the worker
    processes or the HTTP connection pool, and bounds concurrency across sessions); it is safe to call
    from many tasks at once. Call ``aclose()`` once at shutdown."""

    @property
    def name(self) -> str: ...

    @property
    def enabled(self) -> bool:
        """False for the ``none`` backend: the server should not offer transcription at all."""
        ...

    async def transcribe(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> Transcript:
        """The whole transcript of a 16 kHz mono utterance (float in [-1, 1] or int16). Raises
        `TranscriptionError` (never anything else, except cancellation)."""
        ...

    def transcribe_stream(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> AsyncIterator[TranscriptDelta | Transcript]:
        """Zero or more `TranscriptDelta`, then exactly one `Transcript`; raises `TranscriptionError`."""
        ...

    async def warmup(self) -> None:
        """Load what can be loaded ahead (models, worker processes) so the first user is not kept
        waiting; raises `TranscriptionError` if the backend cannot work at all."""
        ...

    async def aclose(self) -> None: ...


async def transcription_events(
    transcriber: Transcriber,
    samples_16k: np.ndarray,
    *,
    language: str | None = None,
    prompt: str | None = None,
) -> AsyncIterator[TranscriptionEvent]:
    """The transcription of one utterance as events in GA order: ``TranscriptDelta``\\* then one
    `Transcript`, or, if anything fails, one `TranscriptionFailure` last. Never raises, except
    ``CancelledError`` when the caller's task is cancelled, so a bad transcription server can never end a
    session. Run it in its own task: it takes as long as the backend does, and must not hold up the
    answer."""
    stream = transcriber.transcribe_stream(samples_16k, language=language, prompt=prompt)
    try:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]  # an async generator in practice
            async for item in stream:
                yield item
    except TranscriptionError as exc:
        log.warning("input transcription failed (%s): %s", exc.code, exc)
        yield TranscriptionFailure(exc.code, str(exc))
    except Exception as exc:  # a bug in a backend must not end the session
        log.exception("input transcription failed unexpectedly")
        yield TranscriptionFailure("internal_error", f"transcription failed: {type(exc).__name__}: {exc}")


# --- helpers ---------------------------------------------------------------------------------------


def as_float_mono(samples: np.ndarray) -> np.ndarray:
    """16 kHz mono audio as float32 in [-1, 1]: accepts float arrays (clipped; NaN/inf become 0) and
    int16 arrays (scaled by 1/32768), of shape (n,) or (n, 1)."""
    a = np.asarray(samples)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise TranscriptionError(
            f"audio must be mono 16 kHz samples of shape (n,); got shape {a.shape}", "bad_audio"
        )
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if not np.issubdtype(a.dtype, np.floating):
        raise TranscriptionError(f"audio must be float in [-1, 1] or int16; got dtype {a.dtype}", "bad_audio")
    return np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)


def pcm16_bytes(samples: np.ndarray) -> bytes:
    """Float [-1, 1] -> little-endian signed 16-bit bytes."""
    return np.round(as_float_mono(samples) * 32767.0).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV file in memory (what every transcription server accepts)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16_bytes(samples))
    return buf.getvalue()


def primary_language(language: str | None) -> str | None:
    """``en-US`` / ``en_us`` / ``EN`` -> ``en`` (ISO-639-1, what transcription servers take); ''/None -> None."""
    if not language or not language.strip():
        return None
    return re.split(r"[-_]", language.strip(), maxsplit=1)[0].lower()


def normalize_words(text: str) -> list[str]:
    """Words for scoring: lower case, dashes to spaces, punctuation and apostrophes dropped
    ("It's" -> "its", "Darkness," -> "darkness")."""
    text = re.sub(r"[-\u2010-\u2015]", " ", text.lower())
    text = re.sub(r"[^\w\s]", "", text)
    return text.split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after `normalize_words`. Used by the
    tests and ``bench/transcription.py``."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1] / len(ref)


class _Backend(ABC):
    """What every backend shares: ``transcribe_stream`` built on ``transcribe`` for a backend that only
    has whole answers (one delta with the whole text, as OpenAI's whisper-1 does)."""

    name = "?"
    enabled = True

    @abstractmethod
    async def transcribe(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> Transcript:
        """The whole transcript of one utterance; each backend defines it."""

    async def transcribe_stream(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> AsyncIterator[TranscriptDelta | Transcript]:
        transcript = await self.transcribe(samples_16k, language=language, prompt=prompt)
        if transcript.text:
            yield TranscriptDelta(transcript.text)
        yield transcript

    async def warmup(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# --- none ------------------------------------------------------------------------------------------


class NoTranscription(_Backend):
    """Transcription off (backend ``none``). ``enabled`` is False so the server can refuse or ignore
    ``audio.input.transcription``; a call anyway fails with code ``disabled``."""

    name = "none"
    enabled = False

    async def transcribe(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> Transcript:
        raise TranscriptionError(
            "input transcription is off on this server (transcription backend 'none')", "disabled"
        )


# --- pocketsphinx ----------------------------------------------------------------------------------

# Worker-process state: each worker of the pool owns one decoder (pocketsphinx decoders are not
# thread-safe). This lives only in the spawned worker processes, never in the server process.
_WORKER_DECODER: Any = None


def _worker_init(nice: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server shuts the pool down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    _worker_decoder()


def _worker_decoder() -> Any:
    global _WORKER_DECODER
    if _WORKER_DECODER is None:
        from pocketsphinx import Decoder  # the default config is the packaged en-US model at 16 kHz

        _WORKER_DECODER = Decoder(loglevel="FATAL")
    return _WORKER_DECODER


def _worker_decode(pcm16: bytes) -> tuple[str, float]:
    """Runs in a worker process: the best hypothesis for one utterance, and the CPU seconds it took."""
    decoder = _worker_decoder()
    cpu = time.process_time()
    # Start every utterance from the same feature state: otherwise the decoder carries its cepstral mean
    # (and more) over from the previous utterance, so one session's audio would change how the next
    # session's is heard, and results would depend on order. Measured cost: ~0.1 ms.
    decoder.reinit_feat()
    decoder.start_utt()
    try:
        decoder.process_raw(pcm16, full_utt=True)
    finally:
        decoder.end_utt()
    hyp = decoder.hyp()
    return (hyp.hypstr if hyp is not None else "").strip(), time.process_time() - cpu


def _worker_info() -> tuple[int, int]:
    """(pid, niceness) of a worker: for warmup and the tests."""
    return os.getpid(), os.nice(0)


def pocketsphinx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pocketsphinx") is not None


class PocketsphinxTranscriber(_Backend):
    """Offline English transcription with CMU pocketsphinx, in a small pool of worker processes.

    Why processes and not threads: pocketsphinx's Python binding holds the GIL for the whole of
    ``process_raw`` (measured: a thread decoding a 28 s clip froze the event loop for 22 s). In a
    thread it would stop every session of the server; in a process it cannot touch the event loop, a
    crash in its C code cannot take the server down, and the worker can run at a lower CPU priority
    (``worker_nice``) than the engines.

    Workers are started with the ``spawn`` method (never ``fork``: the server has threads and maybe CUDA)
    on first use or by ``warmup()``; each loads the model once (about 1 s; ~130 MB resident per worker). At most
    ``max_concurrency`` utterances are decoded at once; the rest wait in line, and a waiting request
    whose caller is cancelled is dropped. A worker that dies is replaced on the next call, and the
    utterance it was working on fails with code ``backend_crashed``.

    Like any ``spawn`` user, a program that makes one must guard its entry point with
    ``if __name__ == "__main__":`` (console scripts, ``python -m`` and pytest do): the workers import the
    main module.
    """

    name = "pocketsphinx"

    def __init__(
        self,
        *,
        language: str | None = None,
        max_concurrency: int = 1,
        timeout_s: float = 60.0,
        worker_nice: int = 10,
    ) -> None:
        if not pocketsphinx_available():
            raise TranscriptionError(POCKETSPHINX_MISSING, "unavailable")
        self._check_language(language)
        self._language = "en"
        self._workers = max_concurrency
        self._timeout = timeout_s
        self._nice = worker_nice
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None  # made in the running loop
        self._closed = False

    @property
    def model(self) -> str:
        return "pocketsphinx-en-us"

    @staticmethod
    def _check_language(language: str | None) -> None:
        lang = primary_language(language)
        if lang not in (None, "en"):
            raise TranscriptionError(
                f"pocketsphinx ships only an English (en-US) model; language {language!r} is not supported "
                "(use the http backend with a multilingual model such as Whisper)",
                "unsupported_language",
            )

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self._nice,),
            )
        return self._pool

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        # Our own line in front of the pool: the pool hands work to its workers' queue (where it can no
        # longer be cancelled) as soon as it is submitted, so at most one job per worker is submitted, and
        # a slot is freed only when the worker is done, even if the caller stopped waiting earlier.
        if self._closed:
            raise TranscriptionError("the transcriber was closed (server shutting down)", "unavailable")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        slots = self._slots
        await slots.acquire()
        try:
            try:
                future = self._executor().submit(fn, *args)
            except BrokenProcessPool:  # a worker died since the last call: start a fresh pool
                self._discard_pool()
                future = self._executor().submit(fn, *args)
        except BaseException:
            slots.release()
            raise
        loop = asyncio.get_running_loop()

        def free(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(slots.release)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        future.add_done_callback(free)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            if self._closed:
                raise TranscriptionError(
                    "the transcriber was closed (server shutting down)", "unavailable"
                ) from exc
            self._discard_pool()
            raise TranscriptionError(
                f"the pocketsphinx worker process died: {exc}", "backend_crashed"
            ) from exc

    async def warmup(self) -> None:
        """Start every worker and load its model (each worker is started by its own request)."""
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.gather(*(self._run(_worker_info) for _ in range(self._workers)))
        except TimeoutError as exc:
            raise TranscriptionError(
                f"pocketsphinx workers did not start within {self._timeout:g} s", "timeout"
            ) from exc

    async def worker_info(self) -> tuple[int, int]:
        """(pid, niceness) of one worker process."""
        info: tuple[int, int] = await self._run(_worker_info)
        return info

    async def transcribe(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> Transcript:
        """``prompt`` is ignored: pocketsphinx has no way to take one."""
        self._check_language(language)
        pcm = pcm16_bytes(samples_16k)
        audio_s = len(pcm) / 2 / SAMPLE_RATE
        started = time.perf_counter()
        if audio_s < 0.1:  # nothing a recognizer could hear
            return Transcript("", self.name, self.model, self._language, audio_s, 0.0)
        try:
            async with asyncio.timeout(self._timeout):
                text, cpu_s = await self._run(_worker_decode, pcm)
        except TimeoutError as exc:
            raise TranscriptionError(
                f"pocketsphinx did not finish {audio_s:.1f} s of audio within {self._timeout:g} s "
                "(too many utterances waiting? raise max_concurrency or timeout_s)",
                "timeout",
            ) from exc
        elapsed = time.perf_counter() - started
        log.debug("pocketsphinx: %.2f s audio in %.2f s (cpu %.2f s)", audio_s, elapsed, cpu_s)
        return Transcript(text, self.name, self.model, self._language, audio_s, elapsed)

    async def aclose(self) -> None:
        """Stop the workers now, even mid-decode: nobody is waiting for those transcripts any more, and a
        server shutting down should not wait tens of seconds for them."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # The pool's processes are private (``_processes``, there since Python 3.2; 3.14 adds
        # ``terminate_workers()``): read them before ``shutdown`` clears them.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        await asyncio.to_thread(pool.shutdown, True)


# --- http (OpenAI-compatible) ----------------------------------------------------------------------


def _transcriptions_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/audio/transcriptions"):
        return url
    return url + ("/audio/transcriptions" if url.endswith("/v1") else "/v1/audio/transcriptions")


def _error_detail(body: bytes) -> str:
    """The server's error message: OpenAI's ``{"error": {"message": ...}}``, FastAPI's ``{"detail": ...}``
    or the start of the body."""
    text = body[:2000].decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300].strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])[:300]
    return text[:300].strip()


class OpenAITranscriptionClient(_Backend):
    """Transcription by an OpenAI-compatible server: ``POST {url}/v1/audio/transcriptions`` with a
    multipart form (``file`` = the utterance as a 16 kHz 16-bit mono WAV, ``model``,
    ``response_format=json``, and ``language`` / ``prompt`` / ``stream`` when set), answer
    ``{"text": ...}``.

    Why this API: it is the one every Whisper server speaks (OpenAI, vLLM's ``--task transcription``,
    speaches / faster-whisper-server, LocalAI), so the server needs no ASR of its own to transcribe
    well. With ``stream=True`` the server's Server-Sent Events are passed on as deltas; the three
    dialects in use are understood: OpenAI's ``transcript.text.delta`` / ``.done``, vLLM's
    chat-completion-style ``choices[0].delta.content`` ending with ``[DONE]``, and plain ``{"text": ...}``
    segments.

    Every failure (refused connection, timeout, non-200, a body that is not a transcription) becomes a
    `TranscriptionError` naming the URL and what was wrong; the API key never appears in it.
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "whisper-1",
        api_key: str | None = None,
        language: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        stream: bool = False,
    ) -> None:
        self.url = _transcriptions_url(base_url)
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._language = primary_language(language)
        self._timeout = timeout_s
        self._stream = stream
        self._max_concurrency = max_concurrency
        self._semaphore: asyncio.Semaphore | None = None
        self._client: Any = None  # httpx.AsyncClient, made on first use inside the running loop

    @property
    def model(self) -> str:
        return self._model

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                limits=httpx.Limits(max_connections=self._max_concurrency),
            )
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._max_concurrency)
        return self._client

    def _form(self, language: str | None, prompt: str | None, stream: bool) -> dict[str, str]:
        form = {"model": self._model, "response_format": "json"}
        lang = primary_language(language) or self._language
        if lang:
            form["language"] = lang
        if prompt:
            form["prompt"] = prompt
        if stream:
            form["stream"] = "true"
        return form

    def _transcript(self, text: str, language: str | None, audio_s: float, started: float) -> Transcript:
        lang = primary_language(language) or self._language
        return Transcript(text.strip(), self.name, self._model, lang, audio_s, time.perf_counter() - started)

    def _parse_json(self, body: bytes) -> str:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            snippet = body[:200].decode(errors="replace")
            raise TranscriptionError(
                f"transcription server {self.url} answered 200 but not JSON with a 'text' string: {snippet!r}",
                "bad_response",
            )
        return str(data["text"])

    async def transcribe(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> Transcript:
        final: Transcript | None = None
        async for item in self.transcribe_stream(samples_16k, language=language, prompt=prompt):
            if isinstance(item, Transcript):
                final = item
        assert final is not None  # transcribe_stream always ends with a Transcript or raises
        return final

    async def transcribe_stream(
        self, samples_16k: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> AsyncIterator[TranscriptDelta | Transcript]:
        import httpx

        audio = as_float_mono(samples_16k)
        audio_s = len(audio) / SAMPLE_RATE
        started = time.perf_counter()
        if audio_s < 0.1:  # servers reject (or hallucinate on) empty audio
            yield self._transcript("", language, audio_s, started)
            return
        client = self._http()
        assert self._semaphore is not None
        files = {"file": ("audio.wav", wav_bytes(audio), "audio/wav")}
        request = client.build_request(
            "POST",
            self.url,
            data=self._form(language, prompt, self._stream),
            files=files,
            headers=self._headers,
        )
        # One deadline for the whole transcription, applied to each await separately: a timeout scope must
        # never span a ``yield`` (it would cancel whatever the consumer is doing at that moment).
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._semaphore.acquire()
            try:
                async with asyncio.timeout_at(deadline):
                    response = await client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        async with asyncio.timeout_at(deadline):
                            body = await response.aread()
                        raise TranscriptionError(
                            f"transcription server {self.url} answered {response.status_code}: {_error_detail(body)}",
                            "server_error",
                        )
                    if "text/event-stream" not in response.headers.get("content-type", ""):
                        async with asyncio.timeout_at(deadline):
                            body = await response.aread()
                        text = self._parse_json(body)
                        if text.strip():
                            yield TranscriptDelta(text.strip())
                        yield self._transcript(text, language, audio_s, started)
                        return
                    pieces: list[str] = []
                    done_text: str | None = None
                    lines = response.aiter_lines().__aiter__()
                    while True:
                        try:
                            async with asyncio.timeout_at(deadline):
                                line = await anext(lines)
                        except StopAsyncIteration:
                            break
                        event = self._parse_sse_line(line)
                        if event is None:
                            continue
                        if event == "[DONE]":
                            break
                        kind, value = event
                        if kind == "done":
                            done_text = value
                        elif value:
                            pieces.append(value)
                            yield TranscriptDelta(value)
                    text = done_text if done_text is not None else "".join(pieces)
                    yield self._transcript(text, language, audio_s, started)
                finally:
                    await response.aclose()
            finally:
                self._semaphore.release()
        except TimeoutError as exc:
            raise TranscriptionError(
                f"transcription server {self.url} did not answer within {self._timeout:g} s", "timeout"
            ) from exc
        except httpx.TimeoutException as exc:
            raise TranscriptionError(
                f"transcription server {self.url} did not answer within {self._timeout:g} s", "timeout"
            ) from exc
        except httpx.HTTPError as exc:
            raise TranscriptionError(
                f"transcription server {self.url} could not be reached or broke off: {type(exc).__name__}: {exc}",
                "connection_error",
            ) from exc

    def _parse_sse_line(self, line: str) -> tuple[str, str] | Literal["[DONE]"] | None:
        """One SSE line -> ("delta", text) / ("done", full text) / "[DONE]" / None (nothing to use)."""
        if not line.startswith("data:"):
            return None
        payload = line[5:].strip()
        if not payload:
            return None
        if payload == "[DONE]":
            return "[DONE]"
        try:
            data = json.loads(payload)
        except ValueError:
            raise TranscriptionError(
                f"transcription server {self.url} streamed an event that is not JSON: {payload[:200]!r}",
                "bad_response",
            ) from None
        if not isinstance(data, dict):
            return None
        if data.get("type") == "error" or isinstance(data.get("error"), dict | str):
            raise TranscriptionError(
                f"transcription server {self.url} streamed an error: {_error_detail(payload.encode())}",
                "server_error",
            )
        kind = data.get("type")
        if kind == "transcript.text.delta":  # OpenAI
            return "delta", str(data.get("delta") or "")
        if kind == "transcript.text.done":
            return "done", str(data.get("text") or "")
        choices = data.get("choices")
        if isinstance(choices, list) and choices:  # vLLM
            delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
            return "delta", str((delta or {}).get("content") or "")
        if isinstance(data.get("text"), str):  # speaches: one segment per event
            return "delta", data["text"]
        return None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# --- factory ---------------------------------------------------------------------------------------


def make_transcriber(settings: TranscriptionSettings) -> Transcriber:
    """The backend ``settings`` names. Raises `TranscriptionError` (code ``unavailable``) when the
    pocketsphinx backend is asked for but not installed, so a server can fall back to ``none`` with a
    warning, as it does when the espeak voice is missing."""
    if settings.backend == "pocketsphinx":
        return PocketsphinxTranscriber(
            language=settings.language,
            max_concurrency=settings.max_concurrency or 1,
            timeout_s=settings.timeout_s,
            worker_nice=settings.worker_nice,
        )
    if settings.backend == "http":
        assert settings.url is not None  # checked by TranscriptionSettings
        return OpenAITranscriptionClient(
            settings.url,
            model=settings.model,
            api_key=settings.api_key,
            language=settings.language,
            max_concurrency=settings.max_concurrency or 8,
            timeout_s=settings.timeout_s,
            stream=settings.stream,
        )
    return NoTranscription()


# --- per session -----------------------------------------------------------------------------------

# What a recognizer makes of a cough, a breath or a hesitation: a transcript of nothing but these is not
# a question. Kept short on purpose: "no", "hi" and "yes" are answers.
FILLER_WORDS = frozenset({
    "a", "ah", "aha", "eh", "er", "erm", "ha", "hm", "hmm", "huh", "mhm", "mm", "mmm", "oh", "uh", "uhm", "um",
    "the", "an", "i",
})


def is_noise_transcript(text: str | None) -> bool:
    """Whether a transcript is empty or near-empty: no words, or only hesitation sounds and lone articles
    ("", "uh", "the", "hmm oh"). A model that hears through transcripts treats such a segment as noise
    (as VITA's ☟), so a cough does not get an answer."""
    return all(word in FILLER_WORDS for word in normalize_words(text or ""))


class ClipTranscription:
    """One clip's transcription, running in its own task: its events so far (GA order, ending with one
    `Transcript` or `TranscriptionFailure`), for any number of readers, early or late."""

    def __init__(self, transcriber: Transcriber, audio: np.ndarray, language: str | None,
                 prompt: str | None) -> None:
        self.events: list[TranscriptionEvent] = []
        self._changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(transcriber, audio, language, prompt))

    async def _run(self, transcriber: Transcriber, audio: np.ndarray, language: str | None,
                   prompt: str | None) -> None:
        try:
            async for event in transcription_events(transcriber, audio, language=language, prompt=prompt):
                self.events.append(event)
                self._changed.set()
        finally:
            self._changed.set()

    @property
    def done(self) -> bool:
        return self.task.done()

    async def follow(self) -> AsyncIterator[TranscriptionEvent]:
        """Every event, from the first, as it comes; ends with the transcription (or when it is cancelled)."""
        seen = 0
        while True:
            while seen < len(self.events):
                seen += 1
                yield self.events[seen - 1]
            if self.task.done():
                return
            self._changed.clear()
            await self._changed.wait()

    async def text(self) -> str | None:
        """The final transcript, or None if the transcription failed or was stopped. Waiting here never
        cancels the transcription itself (another reader may want it)."""
        await asyncio.wait({self.task})
        last = self.events[-1] if self.events else None
        return last.text if isinstance(last, Transcript) else None


class SessionTranscripts:
    """One session's transcriptions, one per clip of user audio: the server's event stream for an item and
    a model that hears through transcripts share it, and a clip that comes back in a later prompt's history
    is not transcribed again. Clips are known by identity (the session keeps the same array object from the
    VAD segment to the history); the newest `max_clips` are kept."""

    def __init__(self, transcriber: Transcriber, *, language: str | None = None, max_clips: int = 32) -> None:
        self.transcriber = transcriber
        self.language = language
        self.prompt: str | None = None
        self._max = max_clips
        self._clips: dict[int, tuple[object, ClipTranscription]] = {}  # insertion order: oldest first

    @property
    def enabled(self) -> bool:
        return bool(self.transcriber.enabled)

    def of(self, audio: Any) -> ClipTranscription:
        """The clip's transcription, started now if it was not yet (call from the event loop)."""
        entry = self._clips.get(id(audio))
        if entry is not None and entry[0] is audio:
            return entry[1]
        clip = ClipTranscription(self.transcriber, np.asarray(audio), self.language, self.prompt)
        self._clips[id(audio)] = (audio, clip)  # holding the object keeps its id from being reused
        while len(self._clips) > self._max:
            _, old = self._clips.pop(next(iter(self._clips)))
            old.task.cancel()  # (a no-op when it is done)
        return clip

    async def text(self, audio: Any) -> str | None:
        return await self.of(audio).text()

    def close(self) -> None:
        """Stop every transcription still running (the session is over)."""
        for _, clip in self._clips.values():
            clip.task.cancel()
        self._clips.clear()
