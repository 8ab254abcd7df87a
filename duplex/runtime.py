"""The asyncio runtime around one session's `DuplexController`.

It feeds the controller events from the VAD, the engines, the TTS and the client, and carries out its
actions: starts and aborts engine requests, runs TTS, paces audio out in real time, and hands
client-facing actions to the transport through `outbound`. It knows nothing of WebSockets or JSON.

Events are fed through one inbox drained in order, so an action that produces an event (a pause
reports the played position) never re-enters the controller mid-list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from models.engine import EngineInput, Sampling
from models.prompts import PromptBuilder, Turn
from models.state_tokens import reply_token_budget, split_state_prefix
from models.video_frames import square_frame

from .controller import ControllerSettings, DuplexController, StateTokens
from .echo import EchoGate, EchoGateParams, EchoGuard, EchoGuardParams
from .events import (
    AbortGeneration,
    Action,
    CancelSpeech,
    ClearOutput,
    ClientCancel,
    ClientTruncate,
    EmitAudio,
    Event,
    FrameCaptured,
    GenerationEnded,
    InputAudio,
    InputText,
    PauseOutput,
    PlaybackPosition,
    ResponseDone,
    ResumeOutput,
    SentenceSynthesized,
    Speak,
    SpeechSynthesized,
    StartGeneration,
    TextInput,
    TokenDelta,
    TurnPrompt,
)
from .sentences import SentenceChunker
from .tts import TextToSpeech, resample
from .vad import SileroModel, VadBank, VadEvent, VadParams, VadSpeechEnd

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the runtime needs of an engine (`models.engine.VitaEngine` fits)."""

    prompts: PromptBuilder

    def generate(self, prompt: EngineInput, request_id: str | None = ..., sampling: Sampling = ...) -> Any: ...

    async def abort(self, request_id: str) -> None: ...


class VadHub:
    """One silero model and one `VadBank` shared by all sessions: whoever pushes audio runs a batched
    ONNX call over every stream with a window ready, so hundreds of sessions share a core.

    With few streams the call runs on the next event-loop turn (no added latency). From
    ``coalesce_from`` streams on, pushes are gathered for ``coalesce_s`` first: sessions push at
    different moments, so one loop turn holds only a few windows, and a batch of one costs as much
    as a batch of dozens (the batched graph pays off from ~16 rows; bench/vad_streams.py)."""

    def __init__(self, model: SileroModel | None = None, coalesce_from: int = 16,
                 coalesce_s: float = 0.010) -> None:
        self._bank = VadBank(model or SileroModel())
        self._sinks: dict[Hashable, Callable[[VadEvent], None]] = {}
        self._scheduled = False
        self.coalesce_from = coalesce_from
        self.coalesce_s = coalesce_s

    def add(self, stream_id: Hashable, params: VadParams, sink: Callable[[VadEvent], None]) -> None:
        self._bank.add_stream(stream_id, params)
        self._sinks[stream_id] = sink

    def remove(self, stream_id: Hashable) -> None:
        self._bank.remove_stream(stream_id)
        self._sinks.pop(stream_id, None)

    def push(self, stream_id: Hashable, samples: np.ndarray) -> None:
        """Buffer audio; all streams pushed during one event-loop turn are scored in one batched call
        at the start of the next turn (one call per push would score one window at a time)."""
        if stream_id not in self._sinks:
            return
        self._bank.push(stream_id, samples)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (scripts, pure tests): score now
            self._process()
            return
        self._scheduled = True
        if len(self._sinks) >= self.coalesce_from:
            loop.call_later(self.coalesce_s, self._process)
        else:
            loop.call_soon(self._process)

    def _process(self) -> None:
        self._scheduled = False
        for sid, event in self._bank.process():
            sink = self._sinks.get(sid)
            if sink is not None:
                sink(event)

    def flush(self, stream_id: Hashable) -> list[VadEvent]:
        """End the stream's speech now (a manual commit); the events also go to its sink."""
        if stream_id not in self._sinks:
            return []
        self._process()  # windows already buffered come first
        events = self._bank.flush(stream_id)
        for event in events:
            self._sinks[stream_id](event)
        return events


@dataclass
class RuntimeSettings:
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    vad: VadParams = field(default_factory=VadParams)
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=256))
    # The assistant's own voice coming back through the user's microphone is not a barge-in.
    # decision_ms is the wait after an onset while output plays: 100 ms keeps onset → pause ≤ 150 ms.
    echo: EchoGuardParams = field(default_factory=EchoGuardParams)
    echo_gate: EchoGateParams = field(default_factory=lambda: EchoGateParams(decision_ms=100.0))


def state_tokens_for(engine: Any) -> StateTokens | None:
    """The controller's state tokens (ids and text) from an engine's checkpoint config."""
    ids = getattr(engine, "state_tokens", None)
    if ids is None:
        return None
    return StateTokens.for_layout(engine.config.layout, ids)


class _Pacer:
    """Estimates what the client has played of the current response: audio plays in real time from
    the moment its first chunk was sent, and stops at what was sent."""

    def __init__(self, rate: int, clock: Callable[[], float]) -> None:
        self.rate, self.clock = rate, clock
        self.response_id: str | None = None
        self.sent_end = 0
        self.base = 0  # played position when the clock (re)started
        self.started: float | None = None  # None: paused or not started

    def reset(self, response_id: str | None) -> None:
        self.response_id, self.sent_end, self.base, self.started = response_id, 0, 0, None

    def played(self) -> int:
        if self.started is None:
            return min(self.base, self.sent_end)
        return min(self.sent_end, self.base + int((self.clock() - self.started) * self.rate))

    def sent(self, response_id: str, end: int) -> None:
        if response_id != self.response_id:
            self.reset(response_id)
        if self.started is None:
            self.started = self.clock()
        self.sent_end = max(self.sent_end, end)

    def pause(self) -> int:
        self.base = self.played()
        self.started = None
        self.sent_end = self.base  # the client dropped what it buffered past this point
        return self.base

    def seconds_until_played(self) -> float:
        return max(0.0, (self.sent_end - self.played()) / self.rate)


class DuplexSession:
    """One live session: audio/frames/text in, client actions out on `outbound`."""

    def __init__(
        self,
        engines: Sequence[Engine],
        tts: TextToSpeech,
        vad: VadHub,
        settings: RuntimeSettings | None = None,
        *,
        session_id: str = "s",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A shallow copy: set_vad_params / set_max_tokens replace fields of this session's settings only.
        self.settings = replace(settings) if settings is not None else RuntimeSettings()
        self.session_id = session_id
        # The caller's list itself, not a copy: an engine the server restarts replaces its slot.
        self._engines = engines
        self._tts = tts
        self._vad = vad
        self.controller = DuplexController(
            self.settings.controller, session_id=session_id, chunker_factory=SentenceChunker
        )
        self.outbound: asyncio.Queue[Action] = asyncio.Queue()
        self._inbox: deque[Event] = deque()
        self._draining = False
        self._samples_in = 0
        self._requests: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self._speech_tasks: dict[str, asyncio.Task[None]] = {}
        self._speech_queues: dict[str, asyncio.Queue[tuple[int, str] | None]] = {}
        self._pacer = _Pacer(self.settings.controller.output_sample_rate, clock)
        self._progress_timer: asyncio.TimerHandle | None = None
        self._aborts: set[asyncio.Task[None]] = set()
        self._closed = False
        self._vad_base = 0  # input sample where the current VAD stream began
        self._vad_on = True
        rate = self.settings.controller.output_sample_rate
        self._echo = EchoGuard(replace(self.settings.echo, output_rate=rate))
        self._gate = EchoGate(self._echo, self.settings.echo_gate)
        vad.add(session_id, self.settings.vad, self._on_vad)

    # --- inputs ---------------------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray) -> None:
        """16 kHz mono float32 microphone audio, in arrival order."""
        if self._closed:
            return
        self._samples_in += len(samples)
        for event in self._gate.push_mic(samples):  # the echo gate sees the audio before the VAD
            self._feed(event)
        self._vad.push(self.session_id, samples)

    def set_vad_params(self, params: VadParams | None) -> None:
        """New VAD parameters (a fresh stream from here on), or None for manual turns (no VAD)."""
        self._vad.remove(self.session_id)
        self._gate.reset()
        self._vad_on = params is not None
        if params is not None:
            self.settings.vad = params
            self._vad_base = self._samples_in
            self._vad.add(self.session_id, params, self._on_vad)

    def flush_speech(self) -> bool:
        """Close the speech segment in progress now; False when there was none."""
        return any(isinstance(e, VadSpeechEnd) for e in self._vad.flush(self.session_id))

    def push_frame(self, frame: Any) -> None:
        self._feed(FrameCaptured(frame, self._samples_in))

    def set_max_tokens(self, max_tokens: int) -> None:
        """Token budget of answers started from now on."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
        self.settings.sampling = replace(self.settings.sampling, max_tokens=max_tokens)

    def send_text(self, text: str) -> None:
        self._feed(TextInput(text))

    def cancel_response(self, response_id: str | None = None) -> None:
        self._feed(ClientCancel(response_id))

    def truncate(self, response_id: str, audio_end_ms: int) -> None:
        self._feed(ClientTruncate(response_id, audio_end_ms))

    def feed(self, event: Event) -> None:
        """Any other controller event (user items, response requests, session updates)."""
        self._feed(event)

    @property
    def input_samples(self) -> int:
        return self._samples_in

    def live_request_ids(self) -> list[str]:
        return list(self._requests)

    async def close(self) -> None:
        """Abort everything this session started; stop TTS; nothing keeps running."""
        self._closed = True
        self._vad.remove(self.session_id)
        if self._progress_timer is not None:
            self._progress_timer.cancel()
        for request_id, (engine, task) in list(self._requests.items()):
            task.cancel()
            await self._engines[engine].abort(request_id)
        for task in [*self._speech_tasks.values(), *[t for _, t in self._requests.values()]]:
            task.cancel()
        await asyncio.gather(*self._speech_tasks.values(), *[t for _, t in self._requests.values()],
                             *self._aborts, return_exceptions=True)
        self._requests.clear()
        self._speech_tasks.clear()

    # --- the inbox ------------------------------------------------------------------------------

    def _on_vad(self, event: VadEvent) -> None:
        # VAD streams count from their own start; the gate converts to session samples, holds onsets
        # while output plays, and swallows segments that are only our own voice coming back.
        for converted in self._gate.on_vad(event, self._vad_base):
            self._feed(converted)

    def _feed(self, event: Event) -> None:
        if self._closed:
            return
        self._inbox.append(event)
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                for action in self.controller.handle(self._inbox.popleft()):
                    self._do(action)
        finally:
            self._draining = False

    # --- actions --------------------------------------------------------------------------------

    def _do(self, action: Action) -> None:
        if isinstance(action, StartGeneration):
            self._start_generation(action)
        elif isinstance(action, AbortGeneration):
            self._abort(action.request_id)
        elif isinstance(action, Speak):
            self._speak(action)
        elif isinstance(action, CancelSpeech):
            self._cancel_speech(action.response_id)
        elif isinstance(action, EmitAudio):
            restart = self._pacer.started is None or self._pacer.response_id != action.response_id
            self._pacer.sent(action.response_id, action.start_sample + action.num_samples)
            pcm = np.asarray(action.pcm, dtype=np.float32)[action.offset : action.offset + action.num_samples]
            self._echo.note_emitted(pcm, action.start_sample, self._samples_in, restart)
            self.outbound.put_nowait(action)
            self._arm_progress()
        elif isinstance(action, PauseOutput):
            self._forget_unplayed_output()
            self.outbound.put_nowait(action)
            played = self._pacer.pause() if self._pacer.response_id == action.response_id else 0
            self._inbox.append(PlaybackPosition(action.response_id, played, reply_to_pause=True))
        elif isinstance(action, ResumeOutput):
            self.outbound.put_nowait(action)
        elif isinstance(action, ClearOutput):
            self._forget_unplayed_output()
            if self._pacer.response_id == action.response_id:
                self._pacer.reset(None)
            self.outbound.put_nowait(action)
        else:  # EmitText and notices: news for the client
            if isinstance(action, ResponseDone):
                self._finish_speech(action.response_id)
            self.outbound.put_nowait(action)

    def _forget_unplayed_output(self) -> None:
        """The client dropped what it had buffered: that audio will never echo back."""
        self._echo.discard_from(self._samples_in + self._echo.params.ms(self._echo.params.max_delay_ms))

    def _start_generation(self, action: StartGeneration) -> None:
        engine = self._engines[action.engine]
        prompt = self._render(engine, action.prompt)
        task = asyncio.ensure_future(self._generate(engine, action.request_id, prompt))
        self._requests[action.request_id] = (action.engine, task)

    async def _generate(self, engine: Engine, request_id: str, prompt: EngineInput) -> None:
        sampling = self.settings.sampling
        # max_tokens counts the reply the user gets: the state token comes on top.
        budget = reply_token_budget(sampling.max_tokens, self.settings.controller.state_tokens)
        try:
            async for delta in engine.generate(prompt, request_id, replace(sampling, max_tokens=budget)):
                if delta.token_ids or delta.text:
                    self._feed(TokenDelta(request_id, tuple(delta.token_ids), delta.text))
                if delta.finish_reason is not None:
                    reason = delta.finish_reason if delta.finish_reason in ("stop", "length", "abort") else "stop"
                    self._requests.pop(request_id, None)
                    self._feed(GenerationEnded(request_id, reason))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure ends this request only; the session goes on
            log.warning("session %s request %s failed: %s", self.session_id, request_id, exc)
            self._requests.pop(request_id, None)
            self._feed(GenerationEnded(request_id, "error", str(exc)))

    def _abort(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        engine_index, _task = entry
        # The engine's stream ends with "abort", which the generate task reports; the controller
        # ignores events of aborted requests.
        task = asyncio.ensure_future(self._engines[engine_index].abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def _render(self, engine: Engine, prompt: TurnPrompt) -> EngineInput:
        """TurnPrompt → token ids + media, with VITA's template for this checkpoint (`models.prompts`:
        images, then the text, then the audio of each user turn; replies after their state token)."""
        layout = engine.prompts.config.layout
        turns: list[Turn] = []
        audios: list[np.ndarray] = []
        for past in prompt.history:
            texts = [p.text for p in past.user if isinstance(p, InputText)]
            clips = [np.asarray(p.audio, dtype=np.float32) for p in past.user if isinstance(p, InputAudio)]
            audios += clips
            turns.append(Turn("user", text=" ".join(texts), audios=len(clips)))
            state, reply = split_state_prefix(past.assistant, layout)  # the controller put it there
            turns.append(Turn("assistant", text=reply, state=state))
        clips = [np.asarray(a, dtype=np.float32) for a in prompt.audio]
        audios += clips
        size = engine.prompts.config.vision_config.image_size
        images = [square_frame(f, size) if prompt.modality == "video" else f for f in prompt.frames]
        turns.append(Turn("user", text=prompt.text or "", images=len(images), audios=len(clips)))
        system = engine.prompts.system_prompt(prompt.modality)
        if prompt.instructions:
            system = f"{system}\n{prompt.instructions}"
        ids = engine.prompts.build(turns, modality=prompt.modality, system=system)
        return EngineInput(ids, images=images, audios=audios, max_dynamic_patch=1 if prompt.modality == "video" else None)

    # --- speech out -----------------------------------------------------------------------------

    def _speak(self, action: Speak) -> None:
        queue = self._speech_queues.get(action.response_id)
        if queue is None:
            queue = asyncio.Queue()
            self._speech_queues[action.response_id] = queue
            self._speech_tasks[action.response_id] = asyncio.ensure_future(
                self._synthesize(action.response_id, queue)
            )
        queue.put_nowait((action.sentence_index, action.text))

    async def _synthesize(self, response_id: str, queue: asyncio.Queue[tuple[int, str] | None]) -> None:
        rate = self.settings.controller.output_sample_rate
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                index, text = item
                async with contextlib.aclosing(self._tts.synthesize(text)) as chunks:
                    async for pcm in chunks:
                        pcm = resample(pcm, self._tts.sample_rate, rate)
                        if len(pcm):
                            self._feed(SpeechSynthesized(response_id, index, pcm, len(pcm)))
                self._feed(SentenceSynthesized(response_id, index))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a TTS failure loses this audio, not the session
            log.warning("session %s TTS failed for %s: %s", self.session_id, response_id, exc)

    def _finish_speech(self, response_id: str) -> None:
        queue = self._speech_queues.pop(response_id, None)
        self._speech_tasks.pop(response_id, None)
        if queue is not None:
            queue.put_nowait(None)  # the synthesis task ends after what is queued

    def _cancel_speech(self, response_id: str) -> None:
        task = self._speech_tasks.pop(response_id, None)
        self._speech_queues.pop(response_id, None)
        if task is not None:
            task.cancel()

    def _arm_progress(self) -> None:
        """Tell the controller once everything sent has played, so a spoken response can complete."""
        if self._progress_timer is not None:
            self._progress_timer.cancel()
        response_id = self._pacer.response_id
        if response_id is None:
            return
        loop = asyncio.get_running_loop()

        def report() -> None:
            if self._pacer.response_id == response_id and self._pacer.started is not None:
                self._feed(PlaybackPosition(response_id, self._pacer.sent_end, reply_to_pause=False))

        self._progress_timer = loop.call_later(self._pacer.seconds_until_played(), report)

