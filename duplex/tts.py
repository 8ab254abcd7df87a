"""Text-to-speech interface and backends.

* `TextToSpeech`: what the duplex loop needs: a sample rate and an async iterator of float32 PCM
  chunks. Cancelling means the caller stops iterating (``aclose()`` or cancelling its task); the
  backend then stops its work promptly.
* `EspeakTTS`: espeak-ng from the optional ``espeakng-loader`` package (library and voice data in a
  wheel, no apt), driven through ctypes. espeak-ng is GPL-3, so it is only loaded at run time when
  the user installed the ``[espeak]`` extra; nothing in the core imports it.
* `TextOnlyTTS`: produces no audio (text-only replies).
* `resample` and `float_to_pcm16` helpers for the wire format.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import unicodedata
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np

ESPEAK_MISSING = (
    "EspeakTTS needs the optional GPL extra: pip install 'vita-duplex[espeak]'; or use the text-only mode"
)


class EspeakUnavailableError(RuntimeError):
    """The espeak-ng library could not be loaded."""


@runtime_checkable
class TextToSpeech(Protocol):
    """A speech synthesizer. ``synthesize`` is an async generator (``async def`` with ``yield``)
    yielding float32 mono chunks in [-1, 1] at ``sample_rate``.

    Iterate it inside ``contextlib.aclosing(...)``: a bare ``async for`` that is cancelled or left
    early does not close the generator, so its work only stops when Python collects it.

    ``first`` says whether ``text`` is the first sentence of an answer (True), a later one (False), or
    unknown (None). Most backends ignore it; the vita voice (`duplex.tts_vita`) starts an answer with a
    shorter first audio chunk, as upstream does."""

    @property
    def sample_rate(self) -> int: ...

    def synthesize(self, text: str, *, first: bool | None = None) -> AsyncIterator[np.ndarray]: ...


def speakable(text: str) -> str:
    """Drop control characters: espeak takes a C string, so a NUL (which a model can emit) would end
    the utterance there, and other controls are read out or ignored unpredictably."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


class TextOnlyTTS:
    """No audio: for sessions that only want text."""

    def __init__(self, sample_rate: int = 24_000) -> None:
        self._rate = sample_rate

    @property
    def sample_rate(self) -> int:
        return self._rate

    async def synthesize(self, text: str, *, first: bool | None = None) -> AsyncIterator[np.ndarray]:
        return
        yield  # unreachable; makes this an async generator


# --- espeak-ng through ctypes -------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # synthesize in the calling thread, hand buffers to the callback
_INIT_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_EE_OK = 0
_BUFFER_MS = 100  # audio per callback: the granularity of streaming and of cancellation

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _espeak_loader() -> ModuleType:
    """Import the optional GPL package, or fail with a message that says what to do."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise EspeakUnavailableError(ESPEAK_MISSING) from exc
    return espeakng_loader


class _EspeakEngine:
    """The process's one espeak-ng instance. espeak-ng keeps voice, parameters and the synth callback
    in C globals, so there can only be one per process; ``lock`` serializes every use of it."""

    def __init__(self) -> None:
        loader = _espeak_loader()
        try:
            lib = ctypes.CDLL(loader.get_library_path())
            data = Path(loader.get_data_path())
        except (OSError, RuntimeError) as exc:
            raise EspeakUnavailableError(f"espeak-ng library failed to load: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        # espeak wants the directory that contains espeak-ng-data
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, str(data.parent).encode(), _INIT_DONT_EXIT
        )
        if rate <= 0:
            raise EspeakUnavailableError(f"espeak_Initialize failed ({rate}) with data in {data}")
        self.lib = lib
        self.sample_rate = int(rate)
        self.lock = threading.Lock()
        self._sink: Callable[[np.ndarray], bool] | None = None
        self._callback = _SynthCallback(self._on_audio)  # kept referenced: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav: ctypes._Pointer, n: int, _events: int | None) -> int:
        # Runs inside espeak_Synth on the synthesizing thread. Returning 1 aborts the synthesis.
        # Exceptions cannot cross the C boundary, so any failure aborts too.
        try:
            sink = self._sink
            if sink is None:
                return 1
            if n > 0 and wav:
                pcm = np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0
                return 0 if sink(pcm) else 1
            return 0
        except BaseException:  # noqa: BLE001 - see above
            return 1

    def synth(
        self,
        text: str,
        voice: str,
        rate_wpm: int,
        sink: Callable[[np.ndarray], bool],
        cancelled: threading.Event | None = None,
    ) -> None:
        """Synthesize ``text`` in this thread, handing chunks to ``sink`` (False = stop)."""
        text = speakable(text)
        # Poll the lock so a cancelled request that is still queued behind another one gives up.
        while not self.lock.acquire(timeout=0.05):
            if cancelled is not None and cancelled.is_set():
                return
        try:
            if cancelled is not None and cancelled.is_set():
                return
            if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
            data = text.encode("utf-8")
            self._sink = sink
            try:
                self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
                self.lib.espeak_Synchronize()
            finally:
                self._sink = None
        finally:
            self.lock.release()


# The only module-level mutable state: the handle to espeak-ng's process-global C state, created on
# first use (so importing this module never loads GPL code) and guarded by _ENGINE_LOCK.
_ENGINE: _EspeakEngine | None = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> _EspeakEngine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _EspeakEngine()
        return _ENGINE


class EspeakTTS:
    """espeak-ng voice at its native rate (22050 Hz). Syntheses run one at a time in worker threads
    (espeak is process-global), so the event loop never blocks; espeak runs ~1000x faster than real
    time, so the lock is held for milliseconds per sentence."""

    def __init__(self, voice: str = "en-us", rate_wpm: int = 175) -> None:
        self.voice = voice
        self.rate_wpm = rate_wpm
        self._engine = _engine()

    @property
    def sample_rate(self) -> int:
        return self._engine.sample_rate

    def synthesize_blocking(self, text: str) -> np.ndarray:
        """The whole utterance as one float32 array (blocks the calling thread)."""
        chunks: list[np.ndarray] = []

        def sink(pcm: np.ndarray) -> bool:
            chunks.append(pcm)
            return True

        if text.strip():
            self._engine.synth(text, self.voice, self.rate_wpm, sink)
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    async def synthesize(self, text: str, *, first: bool | None = None) -> AsyncIterator[np.ndarray]:
        """Stream chunks (~100 ms each) as espeak produces them (``first`` is ignored). Stopping iteration (``aclose`` or
        task cancellation) aborts the synthesis at its next buffer and waits for the worker, so
        nothing outlives the iteration. There is no backpressure on purpose: pausing espeak for a
        slow consumer would hold the process-wide lock and stall every other session."""
        if not text.strip():
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: np.ndarray | BaseException | None) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed under us: nobody is listening
                return False
            return True

        def sink(pcm: np.ndarray) -> bool:
            return not cancelled.is_set() and put(pcm)

        def work() -> None:
            try:
                self._engine.synth(text, self.voice, self.rate_wpm, sink, cancelled)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)
            finally:
                put(None)

        worker = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await asyncio.wait({worker})


# --- audio helpers ------------------------------------------------------------------------------


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 resampling with soxr (high quality)."""
    x = np.asarray(pcm, dtype=np.float32)
    if from_rate == to_rate or x.size == 0:
        return x.copy()
    import soxr

    return soxr.resample(x, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    """Float [-1, 1] -> little-endian signed 16-bit bytes (clipped)."""
    x = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()
