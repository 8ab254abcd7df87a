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
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from models.config import hears, sees
from models.engine import EngineInput, Sampling
from models.errors import EngineRequestError
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
    InputDropped,
    InputImage,
    InputText,
    PauseOutput,
    PlaybackPosition,
    ResponseDone,
    ResumeOutput,
    SentenceSynthesized,
    Speak,
    SpeechStopped,
    SpeechSynthesized,
    StartGeneration,
    TextInput,
    TokenDelta,
    TurnPrompt,
)
from .sentences import SentenceChunker
from .transcription import NoTranscription, SessionTranscripts, Transcriber, is_noise_transcript
from .tts import TextToSpeech, resample
from .vad import VadEvent, VadParams, VadSpeechEnd
from .vad_hub import RunBlocking, VadHub

log = logging.getLogger(__name__)

# The echo gate's segment states whose checks run as the microphone's audio arrives (EchoGate.push_mic): while
# one is open, audio is pushed as it comes (DuplexSession.mic_watched).
_GATE_WATCHING = frozenset({"pending", "echo"})


__all__ = ["DuplexSession", "RuntimeSettings", "VadHub", "state_tokens_for"]



class Engine(Protocol):
    """What the runtime needs of an engine (`models.engine.VitaEngine` fits)."""

    prompts: PromptBuilder

    def generate(self, prompt: EngineInput, request_id: str | None = ..., sampling: Sampling = ...) -> Any: ...

    async def abort(self, request_id: str) -> None: ...


@dataclass
class RuntimeSettings:
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    vad: VadParams = field(default_factory=VadParams)
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=256))
    # The assistant's own voice coming back through the user's microphone is not a barge-in.
    # decision_ms is the wait after an onset while output plays: 100 ms keeps onset → pause ≤ 150 ms.
    echo: EchoGuardParams = field(default_factory=EchoGuardParams)
    echo_gate: EchoGateParams = field(default_factory=lambda: EchoGateParams(decision_ms=100.0))
    # A prompt with more text than this is tokenized through `run_blocking`, off the event loop.
    offload_text_chars: int = 8192


# The verdicts on a turn for an engine that hears through transcripts, as state-token ids the controller
# reads like VITA's first token (negative: no text token has them, and the engine never generates them).
TRANSCRIPT_VERDICT_IDS = {"query": -1, "noise": -2, "text": -3}


def state_tokens_for(engine: Any) -> StateTokens | None:
    """The controller's state tokens (ids and text) from an engine's checkpoint config. An engine that
    cannot hear (no trained audio tower) gets the transcript verdicts instead: the runtime judges each of
    its turns by the transcript (`DuplexSession._generate_heard`) and reports the verdict as its first
    token."""
    config = getattr(engine, "config", None)
    if config is not None and not hears(config):
        return StateTokens.for_layout(config.layout, TRANSCRIPT_VERDICT_IDS)
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
        transcriber: Transcriber | None = None,
        transcription_language: str | None = None,
        run_blocking: RunBlocking | None = None,
    ) -> None:
        """``transcriber`` (shared by the server's sessions) transcribes user speech: for the transport's
        transcription events, and as what an engine that cannot hear is given instead of the audio."""
        # A shallow copy: set_vad_params / set_max_tokens replace fields of this session's settings only.
        self.settings = replace(settings) if settings is not None else RuntimeSettings()
        self.session_id = session_id
        # The caller's list itself, not a copy: an engine the server restarts replaces its slot.
        self._engines = engines
        self._tts = tts
        self._vad = vad
        self._run_blocking = run_blocking  # None: everything runs on the event loop (tests, scripts)
        self.transcripts = SessionTranscripts(transcriber or NoTranscription(),
                                              language=transcription_language)
        self.controller = DuplexController(
            self.settings.controller, session_id=session_id, chunker_factory=SentenceChunker
        )
        self.outbound: asyncio.Queue[Action] = asyncio.Queue()
        self._inbox: deque[Event] = deque()
        self._draining = False
        self._samples_in = 0
        # Each request keeps the engine it went to: a slot may be served by another engine meanwhile (an
        # engine restarting), and the abort must reach the engine that has the request.
        self._requests: dict[str, tuple[Engine, asyncio.Task[None]]] = {}
        self._speech_tasks: dict[str, asyncio.Task[None]] = {}
        self._speech_queues: dict[str, asyncio.Queue[tuple[int, str] | None]] = {}
        self._speech_cancelled_at: dict[str, float] = {}  # perf_counter of each CancelSpeech still unwinding
        self._tts_takes_first = "first" in inspect.signature(tts.synthesize).parameters
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

    @property
    def mic_watched(self) -> bool:
        """Whether something follows the microphone's position closer than the VAD's windows: an engine request
        or speech under way (output is anchored at the microphone's position when sent), output kept for the
        echo check, or a segment the echo gate still decides on (its checks run at microphone positions). Also
        True without a VAD, and once closed. Audio must then be pushed as it comes (see `audio_slack`)."""
        return (self._closed or not self._vad_on or bool(self._requests) or bool(self._speech_tasks)
                or self._echo.holds_output or self._gate.state in _GATE_WATCHING)

    def audio_slack(self) -> int:
        """How many 16 kHz microphone samples the caller may hold back before `push_audio` without changing
        anything this session does, as long as `mic_watched` stays False (issue 14: the server then pushes once
        per VAD window, not per 20 ms event): what the VAD still needs for its next window; 0 while watched."""
        return 0 if self.mic_watched else self._vad.samples_until_window(self.session_id)

    async def push_audio_offloaded(self, samples: np.ndarray) -> None:
        """`push_audio` for a long stretch: the VAD scores it through `run_blocking`, off the event loop
        (without one, as `push_audio`). Push nothing else before it returns."""
        if self._closed:
            return
        if self._run_blocking is None or not self._vad_on:
            self.push_audio(samples)
            return
        self._samples_in += len(samples)
        for event in self._gate.push_mic(samples):
            self._feed(event)
        await self._vad.push_offloaded(self.session_id, samples, self._run_blocking)

    def held_bytes(self) -> int:
        """Memory this session's inputs hold: camera frames, user items awaiting a response or in flight,
        the history's user turns, and the VAD's buffered audio."""
        seen: set[int] = set()
        total = self._vad.held_bytes(self.session_id)
        for obj in self.controller.held():
            value = (obj.audio if isinstance(obj, InputAudio) else obj.image if isinstance(obj, InputImage)
                     else obj.text if isinstance(obj, InputText) else obj)
            if id(value) not in seen:
                seen.add(id(value))
                total += _nbytes(value)
        return total

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
        self.transcripts.close()
        if self._progress_timer is not None:
            self._progress_timer.cancel()
        for request_id, (engine, task) in list(self._requests.items()):
            task.cancel()
            await engine.abort(request_id)
        for task in [*self._speech_tasks.values(), *[t for _, t in self._requests.values()]]:
            task.cancel()
        await asyncio.gather(*self._speech_tasks.values(), *[t for _, t in self._requests.values()],
                             *self._aborts, return_exceptions=True)
        self._requests.clear()
        self._speech_tasks.clear()
        # Let go of every input now (frames, pending items, history): the session object itself may live on
        # in reference cycles until the garbage collector's next full pass.
        self.controller = DuplexController(self.settings.controller, session_id=self.session_id)

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
        if hears(engine.prompts.config):
            seen = self._seen(engine, action)
            if self._run_blocking is not None and _text_chars(seen) > self.settings.offload_text_chars:
                task = asyncio.ensure_future(self._render_then_generate(engine, action.request_id, seen))
            else:
                task = asyncio.ensure_future(self._generate(engine, action.request_id, self._render(engine, seen)))
        else:  # judged and rendered from the transcripts, once they are in
            task = asyncio.ensure_future(self._generate_heard(engine, action))
        self._requests[action.request_id] = (engine, task)

    def _seen(self, engine: Engine, action: StartGeneration) -> TurnPrompt:
        """The turn as the engine can take it: an engine that cannot see (untrained vision tower) gets no
        images or video, and the client and the log are told, instead of an answer to noise."""
        prompt = action.prompt
        if not prompt.frames or sees(engine.prompts.config):
            return prompt
        kind = "video" if prompt.modality == "video" else "image"
        log.info("session %s request %s: the model cannot see; %d %s item(s) left out, answering the rest",
                 self.session_id, action.request_id, len(prompt.frames), kind)
        self.outbound.put_nowait(InputDropped(action.request_id, kind, len(prompt.frames)))
        return replace(prompt, frames=(), modality="audio" if prompt.audio else "text")

    async def _render_then_generate(self, engine: Engine, request_id: str, prompt: TurnPrompt) -> None:
        """A long prompt is tokenized through `run_blocking` (seconds for a long text would stall every
        session on the event loop), then generated as any other."""
        assert self._run_blocking is not None
        try:
            rendered = await self._run_blocking(self._render, engine, prompt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - as an engine failure: this request ends, the session goes on
            log.warning("session %s request %s: prompt failed: %s", self.session_id, request_id, exc)
            self._requests.pop(request_id, None)
            self._feed(GenerationEnded(request_id, "error", str(exc)))
            return
        if request_id in self._requests:  # not aborted meanwhile
            await self._generate(engine, request_id, rendered)

    async def _generate_heard(self, engine: Engine, action: StartGeneration) -> None:
        """A turn for an engine that cannot hear (no trained audio tower): speech, this turn's and the
        history's, becomes its transcript. The verdict VITA's first token would give comes from the
        transcript instead: nothing but noise words (`is_noise_transcript`) is noise, other speech a
        query, typed text a text query. It is fed as the request's first token, so the controller's
        policy (barge-in, supersession, history) is the same as for a model that hears."""
        request_id, prompt = action.request_id, action.prompt
        past = [p.audio for turn in prompt.history for p in turn.user if isinstance(p, InputAudio)]
        clips = [*past, *prompt.audio]
        texts = await asyncio.gather(*(self.transcripts.text(clip) for clip in clips))
        heard = {id(clip): text for clip, text in zip(clips, texts, strict=True)}
        if request_id not in self._requests:  # aborted (superseded, cancelled) while it was transcribed
            return
        tokens = self.settings.controller.state_tokens
        if tokens is not None and tokens.query == TRANSCRIPT_VERDICT_IDS["query"]:
            spoken = " ".join(t for clip in prompt.audio if (t := heard[id(clip)]))
            if not prompt.audio:
                verdict = tokens.text
            elif action.role == "probe" and not (prompt.text or "").strip() and is_noise_transcript(spoken):
                verdict = tokens.noise
            else:
                verdict = tokens.query
            self._feed(TokenDelta(request_id, (verdict,), ""))
            if request_id not in self._requests:  # noise, or refused (an answer is in progress)
                return
        try:
            rendered = self._render(engine, self._seen(engine, action), heard)
        except Exception as exc:  # noqa: BLE001 - as an engine failure: this request ends, the session goes on
            log.warning("session %s request %s: prompt failed: %s", self.session_id, request_id, exc)
            self._requests.pop(request_id, None)
            self._feed(GenerationEnded(request_id, "error", str(exc)))
            return
        await self._generate(engine, request_id, rendered, state_token=False)

    async def _generate(self, engine: Engine, request_id: str, prompt: EngineInput, *,
                        state_token: bool = True) -> None:
        sampling = self.settings.sampling
        # max_tokens counts the reply the user gets: the state token comes on top (an engine that hears
        # through transcripts generates none: its verdict came from the transcript).
        tokens = self.settings.controller.state_tokens if state_token else None
        budget = reply_token_budget(sampling.max_tokens, tokens)
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
            code = exc.code if isinstance(exc, EngineRequestError) else "engine_error"
            self._feed(GenerationEnded(request_id, "error", str(exc), code=code))

    def _abort(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        engine, _task = entry
        # The engine's stream ends with "abort", which the generate task reports; the controller
        # ignores events of aborted requests.
        task = asyncio.ensure_future(engine.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def _render(
        self, engine: Engine, prompt: TurnPrompt, heard: dict[int, str | None] | None = None
    ) -> EngineInput:
        """TurnPrompt → token ids + media, with VITA's template for this checkpoint (`models.prompts`:
        images, then the text, then the audio of each user turn; replies after their state token).

        ``heard``: for an engine that cannot hear, each clip's transcript by ``id(clip)``: a user turn's
        speech becomes its text (after what was typed), and replies carry no state token (such a model
        never learnt them)."""
        layout = engine.prompts.config.layout
        turns: list[Turn] = []
        audios: list[np.ndarray] = []

        def user(typed: str, clips: list[object]) -> tuple[str, int]:
            """The user turn's text and number of audio placeholders."""
            if heard is None:
                audios.extend(np.asarray(clip, dtype=np.float32) for clip in clips)
                return typed, len(clips)
            return " ".join(t for t in (typed, *(heard.get(id(clip)) for clip in clips)) if t), 0

        for past in prompt.history:
            texts = [p.text for p in past.user if isinstance(p, InputText)]
            text, n = user(" ".join(texts), [p.audio for p in past.user if isinstance(p, InputAudio)])
            turns.append(Turn("user", text=text, audios=n))
            state, reply = split_state_prefix(past.assistant, layout)  # the controller put it there
            turns.append(Turn("assistant", text=reply, state=state if heard is None else None))
        text, n = user(prompt.text or "", list(prompt.audio))
        modality = prompt.modality if heard is None or prompt.frames else "text"
        size = engine.prompts.config.vision_config.image_size
        images = [square_frame(f, size) if modality == "video" else f for f in prompt.frames]
        turns.append(Turn("user", text=text, images=len(images), audios=n))
        system = engine.prompts.system_prompt(modality)
        if prompt.instructions:
            system = f"{system}\n{prompt.instructions}"
        ids = engine.prompts.build(turns, modality=modality, system=system)
        patches = 1 if modality == "video" else None
        return EngineInput(ids, images=images, audios=audios, max_dynamic_patch=patches)

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

    def _sentence_audio(self, text: str, first: bool) -> AsyncIterator[np.ndarray]:
        """The TTS stream of one sentence; `first` (an answer's first sentence) for backends that take it
        (the vita voice starts an answer with a shorter first chunk, as upstream)."""
        if self._tts_takes_first:
            return self._tts.synthesize(text, first=first)
        return self._tts.synthesize(text)

    async def _synthesize(self, response_id: str, queue: asyncio.Queue[tuple[int, str] | None]) -> None:
        rate = self.settings.controller.output_sample_rate
        speaking = False
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                index, text = item
                speaking = True
                async with contextlib.aclosing(self._sentence_audio(text, first=index == 0)) as chunks:
                    async for pcm in chunks:
                        pcm = resample(pcm, self._tts.sample_rate, rate)
                        if len(pcm):
                            self._feed(SpeechSynthesized(response_id, index, pcm, len(pcm)))
                speaking = False
                self._feed(SentenceSynthesized(response_id, index))
        except asyncio.CancelledError:
            # The stream was closed on the way out (its backend stopped its work there, the vita voice
            # aborting its vLLM request): say how long that took after the cancel.
            cancelled_at = self._speech_cancelled_at.pop(response_id, None)
            if speaking and cancelled_at is not None and not self._closed:
                self.outbound.put_nowait(SpeechStopped(response_id, time.perf_counter() - cancelled_at))
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
            if not task.done():
                self._speech_cancelled_at[response_id] = time.perf_counter()
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


def _text_chars(prompt: TurnPrompt) -> int:
    """Characters of text a prompt holds (what tokenizing it costs)."""
    history = sum(len(turn.assistant) + sum(len(p.text) for p in turn.user if isinstance(p, InputText))
                  for turn in prompt.history)
    return len(prompt.text or "") + len(prompt.instructions or "") + history


def _nbytes(value: object) -> int:
    """Memory of one held input: an array's bytes, an image's pixels, a text's characters."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return len(value)
    size = getattr(value, "size", None)  # a PIL image: (width, height), and its bands
    if isinstance(size, tuple) and len(size) == 2 and hasattr(value, "getbands"):
        return size[0] * size[1] * len(value.getbands())  # type: ignore[attr-defined]
    return 0
