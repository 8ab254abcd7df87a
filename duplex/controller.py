"""The duplex policy of one session, as a sans-I/O state machine (in the manner of h11/wsproto).

``DuplexController.handle(event) -> list[Action]``: no asyncio, no clock, no engine, TTS or socket
calls. A runtime feeds it VAD, engine, TTS, pacer and client events (`duplex.events`) and carries out
the actions it returns, in order.

The policy in short:

* Two roles: the *generator* engine answers, the *monitor* engine takes each new user turn as a
  *probe* request (one-engine mode: both are concurrent requests on engine 0). VITA's first generated
  token is a state token: ☞/<1> query, ☟/<2> noise, ☜/<3> text query.
* Noise → abort the probe at once; nothing is said, nothing enters history. Query → the probe *becomes*
  the answer (no second prefill): the old answer is cancelled (``turn_detected``) and the roles swap.
* Barge-in: speech (or typed text) that starts while an answer is audible *holds* the output. The first
  hold sends `PauseOutput`; the pacer replies with the played position and output rewinds there, so a
  noise verdict resumes with nothing lost and a query verdict cancels with an exact played position.
* Speech out: transcript deltas go out as they come; sentences go to TTS; audio is laid out per
  sentence on the response's output timeline and emitted only for the current answer when not held.
* A response with audio completes once its generation stopped, every sentence was synthesized and the
  client played everything (the pacer reports it). Completing merely on "emitted" would end the
  response seconds before the user stops hearing it, and barge-in during that tail could no longer
  pause or truncate it.
* History (`duplex.history`) keeps what the user actually heard.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Literal, Protocol

import numpy as np

from duplex.events import (
    AbortGeneration,
    Action,
    CancelSpeech,
    ClearOutput,
    ClientCancel,
    ClientTruncate,
    EmitAudio,
    EmitText,
    Error,
    Event,
    FinishReason,
    FrameCaptured,
    GenerationEnded,
    InputAudio,
    InputImage,
    InputText,
    Modality,
    PauseOutput,
    PlaybackPosition,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    ResponseStatus,
    ResponseTruncated,
    ResumeOutput,
    Role,
    RolesSwapped,
    SegmentClassified,
    SegmentKind,
    SentenceSynthesized,
    SessionUpdated,
    Speak,
    SpeechDiscarded,
    SpeechEnded,
    SpeechStarted,
    SpeechStartedNotice,
    SpeechStoppedNotice,
    SpeechSynthesized,
    StartGeneration,
    TextInput,
    TokenDelta,
    TurnPrompt,
    TurnSource,
    UserItem,
    UserPart,
)
from duplex.history import History, SpokenSentence
from models.state_tokens import StateTokens, VisibleText, classify_first_token

__all__ = ["ControllerSettings", "DuplexController", "SimpleChunker", "StateTokens"]

# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerSettings:
    engines: int = 2  # 1: both roles are concurrent requests on engine 0
    interrupt_response: bool = True  # False: never pause, never interrupt an answer
    create_response: bool = True  # False: VAD events only; speech becomes a pending user item
    history_turns: int = 2
    # None: the checkpoint has no state tokens. The runtime passes the tokenizer's ids
    # (`models.state_tokens`: the same module classifies the first token and filters the visible text).
    state_tokens: StateTokens | None = None
    # What to do when the first token is not a state token (or there are none).
    no_state_token_policy: Literal["answer", "ignore"] = "answer"
    output_sample_rate: int = 24000
    audio_output: bool = True  # False: text only; no Speak, completion does not wait for audio
    max_frames: int = 4  # camera frames per user turn (VITA's demos used 4)
    frame_window_samples: int = 32000  # frames from the last 2 s (16 kHz) before the turn ended
    instructions: str | None = None  # session instructions, overridden by ResponseRequested's
    # Never shown nor spoken; state tokens are removed as well.
    special_texts: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "</s>", "<unk>")

    def __post_init__(self) -> None:
        if self.engines not in (1, 2):
            raise ValueError(f"engines must be 1 or 2; got {self.engines}")
        if self.history_turns < 0:
            raise ValueError(f"history_turns must be >= 0; got {self.history_turns}")
        if self.no_state_token_policy not in ("answer", "ignore"):
            raise ValueError(
                f"no_state_token_policy must be 'answer' or 'ignore'; got {self.no_state_token_policy!r}"
            )
        if self.output_sample_rate <= 0 or self.max_frames < 0 or self.frame_window_samples < 0:
            raise ValueError("output_sample_rate must be > 0, max_frames and frame_window_samples >= 0")


# --- sentence chunking --------------------------------------------------------------------------


class Chunker(Protocol):
    """Cuts streamed text into sentences to speak (`duplex.sentences.SentenceChunker` fits)."""

    def push(self, delta: str) -> list[str]: ...

    def flush(self) -> list[str]: ...


class SimpleChunker:
    """Default chunker: cut after . ! ? followed by whitespace, and after newlines and CJK 。！？."""

    _HARD = "\n。！？"
    _SOFT = ".!?"

    def __init__(self) -> None:
        self._buffer = ""

    def push(self, delta: str) -> list[str]:
        self._buffer += delta
        out: list[str] = []
        start = 0
        buf = self._buffer
        for i, ch in enumerate(buf):
            if ch in self._HARD or (ch in self._SOFT and i + 1 < len(buf) and buf[i + 1].isspace()):
                out.append(buf[start : i + 1])
                start = i + 1
        self._buffer = buf[start:]
        return [s.strip() for s in out if s.strip()]

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []


# --- per-session state --------------------------------------------------------------------------


@dataclass
class _Segment:
    """One user turn: a speech segment, a typed text or a manual turn."""

    segment_id: str
    source: TurnSource
    start: int | None = None
    end: int | None = None


@dataclass
class _Chunk:
    sentence_index: int
    start: int  # output sample of the response
    num_samples: int
    pcm: object

    @property
    def end(self) -> int:
        return self.start + self.num_samples


@dataclass
class _Sentence:
    index: int
    text: str
    char_end: int
    audio_start: int | None = None
    audio_end: int | None = None
    finished: bool = False  # TTS reported SentenceSynthesized
    waiting: list[tuple[object, int]] = field(default_factory=list)  # chunks before its turn to lay out


@dataclass
class _Response:
    response_id: str
    request_id: str | None  # None once its generation ended
    segment: _Segment
    user: tuple[UserPart, ...]
    audio: bool
    chunker: Chunker
    visible: VisibleText  # raw model text -> transcript (no state/special tokens, even split ones)
    prefix: str = ""  # state token text, as it goes into history
    awaiting_first_token: bool = False  # forced answers learn their state token from it
    text: str = ""  # transcript so far
    spoken_chars: int = 0  # text[:spoken_chars] went to TTS
    sentences: list[_Sentence] = field(default_factory=list)
    layout_index: int = 0  # the sentence whose audio is being appended to the timeline
    timeline: list[_Chunk] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # chunk starts, for bisect
    total: int = 0  # output samples laid out
    cursor: int = 0  # output samples handed to the runtime (rewinds on a pause reply)
    played: int = 0  # output samples the client played, as reported (<= cursor)
    held: bool = False  # output held by speech in progress or a pending verdict
    pause_sent: bool = False  # a PauseOutput is in effect (a ResumeOutput is owed)
    pause_replies: int = 0  # PauseOutput replies not yet received
    finish: FinishReason | None = None  # generation end (stop/length)


@dataclass
class _Request:
    request_id: str
    seq: int  # creation order: newer probes supersede older ones
    engine: int
    segment: _Segment
    user: tuple[UserPart, ...]  # what goes into history (vision dropped)
    response: _Response | None = None  # set once this request answers


@dataclass(frozen=True)
class _Frame:
    frame: object
    sample: int


# --- the controller -----------------------------------------------------------------------------


class DuplexController:
    """One session's duplex policy. Ids are ``{session_id}-req-N``, ``-resp-N``, ``-seg-N``."""

    def __init__(
        self,
        settings: ControllerSettings | None = None,
        *,
        session_id: str = "s",
        chunker_factory: Callable[[], Chunker] = SimpleChunker,
    ) -> None:
        self._settings = settings or ControllerSettings()
        self._session_id = session_id
        self._chunker_factory = chunker_factory
        self._history = History(self._settings.history_turns)
        self._generator = 0
        self._monitor = 1 if self._settings.engines == 2 else 0
        self._counters = {"req": 0, "resp": 0, "seg": 0}
        self._requests: dict[str, _Request] = {}
        self._current: _Response | None = None
        self._speech: _Segment | None = None  # speech in progress (SpeechStarted seen)
        self._holds: set[str] = set()  # segment ids holding the output
        self._frames: deque[_Frame] = deque(maxlen=max(32, 8 * self._settings.max_frames))
        self._pending_user: list[UserPart] = []  # user items awaiting ResponseRequested
        self._late_positions: set[str] = set()  # cancelled while a pause reply was owed
        self._now = 0  # latest input sample seen

    # --- read-only views (for the runtime's logs and for tests) ---------------------------------

    @property
    def settings(self) -> ControllerSettings:
        return self._settings

    @property
    def history(self) -> History:
        return self._history

    @property
    def generator(self) -> int:
        return self._generator

    @property
    def monitor(self) -> int:
        return self._monitor

    @property
    def current_response_id(self) -> str | None:
        return None if self._current is None else self._current.response_id

    @property
    def output_held(self) -> bool:
        return self._current is not None and self._current.held

    def live_requests(self) -> dict[str, Role]:
        """Requests started and neither ended nor aborted, with their current role."""
        return {rid: "probe" if r.response is None else "answer" for rid, r in self._requests.items()}

    # --- entry point ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise ValueError(f"not a duplex event: {type(event).__name__}")
        return handler(self, event)

    # --- user turns -----------------------------------------------------------------------------

    def _on_speech_started(self, event: SpeechStarted) -> list[Action]:
        self._advance(event.sample)
        if self._speech is not None:
            return []  # already in a segment: a repeated start changes nothing
        self._speech = _Segment(self._new_id("seg"), "speech", start=event.sample)
        self._hold(self._speech)
        return [*self._sync_output(), SpeechStartedNotice(self._speech.segment_id, event.sample)]

    def _on_speech_ended(self, event: SpeechEnded) -> list[Action]:
        self._advance(event.end_sample)
        segment = self._speech or _Segment(self._new_id("seg"), "speech")
        self._speech = None
        segment.start, segment.end = event.start_sample, event.end_sample
        actions: list[Action] = [SpeechStoppedNotice(segment.segment_id, event.end_sample)]
        user: tuple[UserPart, ...] = (InputAudio(event.audio),)
        frames = self._frames_before(event.end_sample)
        if self._settings.create_response:
            # The hold of the speech passes on to its probe (same segment id).
            return actions + self._start_probe(segment, user, frames, self._settings.instructions)
        # VAD events only: the speech waits as a user item for a manual ResponseRequested. Committed
        # speech is a new user turn, so with interrupt_response it ends the current answer (as OpenAI
        # does at speech start; we waited for the commit so that a dropped blip can still resume).
        self._pending_user.extend(user)
        self._holds.discard(segment.segment_id)
        if self._settings.interrupt_response and self._current is not None:
            actions += self._finish(self._current, "cancelled", "turn_detected")
        return actions + self._sync_output()

    def _on_speech_discarded(self, event: SpeechDiscarded) -> list[Action]:
        self._advance(event.end_sample)
        segment, self._speech = self._speech, None
        if segment is None:
            return []
        self._holds.discard(segment.segment_id)
        notice = SpeechStoppedNotice(segment.segment_id, event.end_sample, committed=False)
        return [*self._sync_output(), notice]

    def _on_frame(self, event: FrameCaptured) -> list[Action]:
        self._advance(event.sample)
        self._frames.append(_Frame(event.frame, event.sample))
        # Keep two windows: a turn's window ends at its end sample, which lags the stream a little.
        oldest = self._now - 2 * self._settings.frame_window_samples
        while self._frames and self._frames[0].sample < oldest:
            self._frames.popleft()
        return []

    def _on_text_input(self, event: TextInput) -> list[Action]:
        segment = _Segment(self._new_id("seg"), "text")
        frames = self._frames_before(self._now)
        return self._start_probe(segment, (InputText(event.text),), frames, self._settings.instructions)

    def _on_user_item(self, event: UserItem) -> list[Action]:
        self._pending_user.extend(event.parts)
        return []

    def _on_response_requested(self, event: ResponseRequested) -> list[Action]:
        if self._current is not None:
            return [
                Error(
                    "conversation_already_has_active_response",
                    f"response {self._current.response_id} is still active; cancel it first",
                )
            ]
        if not self._pending_user:
            return [
                Error(
                    "response_create_without_input",
                    "response.create needs a user item first (conversation.item.create or committed audio)",
                )
            ]
        user, self._pending_user = tuple(self._pending_user), []
        segment = _Segment(self._new_id("seg"), "manual")
        frames = self._frames_before(self._now)
        instructions = event.instructions if event.instructions is not None else self._settings.instructions
        if not event.force:
            return self._start_probe(segment, user, frames, instructions)
        # Forced: answer on the (idle) generator whatever the first token says.
        request = self._new_request(self._generator, segment, user)
        prompt = self._prompt(user, frames, instructions)
        actions: list[Action] = [StartGeneration(request.request_id, request.engine, prompt, "answer")]
        response = self._open_response(request, prefix="")
        response.awaiting_first_token = self._settings.state_tokens is not None
        actions.append(
            ResponseStarted(response.response_id, request.request_id, segment.segment_id, "manual")
        )
        return actions + self._sync_output()

    def _start_probe(
        self,
        segment: _Segment,
        user: tuple[UserPart, ...],
        frames: tuple[object, ...],
        instructions: str | None,
    ) -> list[Action]:
        request = self._new_request(self._monitor, segment, user)
        prompt = self._prompt(user, frames, instructions)
        self._hold(segment)  # until VITA's verdict: a query would cut the current answer anyway
        return [*self._sync_output(), StartGeneration(request.request_id, request.engine, prompt, "probe")]

    # --- engine output --------------------------------------------------------------------------

    def _on_token_delta(self, event: TokenDelta) -> list[Action]:
        request = self._requests.get(event.request_id)
        if request is None:
            return []  # aborted or unknown: late output is dropped
        response = request.response
        if response is None:
            return self._classify(request, event) if event.token_ids else []
        if response.awaiting_first_token and event.token_ids:
            response.awaiting_first_token = False
            response.prefix = self._state_text(self._kind_of(event.token_ids[0]))
        return self._answer_text(response, event.text)

    def _on_generation_ended(self, event: GenerationEnded) -> list[Action]:
        request = self._requests.pop(event.request_id, None)
        if request is None:
            return []  # e.g. the "abort" that follows our AbortGeneration
        response = request.response
        if response is None:
            return self._probe_ended(request, event)
        response.request_id = None
        if event.reason in ("stop", "length"):
            response.finish = event.reason
            actions = self._transcript(response, response.visible.flush())  # a held tail was text after all
            if response.audio:
                actions += self._speak(response, response.chunker.flush())
            return actions + self._sync_output()
        if event.reason == "error":
            return [
                *self._finish(response, "failed", "engine_error"),
                Error("engine_error", f"generation {event.request_id} failed: {event.error or 'unknown'}"),
            ]
        return self._finish(response, "failed", "engine_aborted")  # an abort we did not ask for

    def _probe_ended(self, request: _Request, event: GenerationEnded) -> list[Action]:
        """A probe ended before its first token."""
        self._holds.discard(request.segment.segment_id)
        actions: list[Action] = []
        if event.reason == "error":
            actions.append(
                Error("engine_error", f"probe {request.request_id} failed: {event.error or 'unknown'}")
            )
        else:
            actions.append(self._classified(request.segment, "unknown", ignored=True, reason="no_output"))
        return actions + self._sync_output()

    # --- first-token gating ---------------------------------------------------------------------

    def _classify(self, request: _Request, event: TokenDelta) -> list[Action]:
        kind = self._kind_of(event.token_ids[0])
        if kind == "noise":
            return self._reject(request, "noise", "noise")
        if kind == "unknown" and self._settings.no_state_token_policy == "ignore":
            return self._reject(request, "unknown", "no_state_token")
        if self._current is not None and not self._settings.interrupt_response:
            return self._reject(request, kind, "response_in_progress")
        return self._accept(request, kind, event.text)

    def _reject(self, request: _Request, kind: SegmentKind, reason: str) -> list[Action]:
        del self._requests[request.request_id]
        self._holds.discard(request.segment.segment_id)
        return [
            AbortGeneration(request.request_id),
            self._classified(request.segment, kind, ignored=True, reason=reason),
            *self._sync_output(),
        ]

    def _accept(self, request: _Request, kind: SegmentKind, text: str) -> list[Action]:
        actions: list[Action] = [self._classified(request.segment, kind)]
        # Older probes still waiting are superseded: the user has moved on past them.
        for older in [r for r in self._requests.values() if r.response is None and r.seq < request.seq]:
            actions += self._reject(older, "unknown", "superseded")
        if self._current is not None:
            actions += self._finish(self._current, "cancelled", "turn_detected")
        self._holds.discard(request.segment.segment_id)
        if request.engine != self._generator:  # two engines: the monitor that heard it answers
            self._generator, self._monitor = request.engine, self._generator
            actions.append(RolesSwapped(self._generator, self._monitor))
        response = self._open_response(request, prefix=self._state_text(kind))
        actions.append(
            ResponseStarted(
                response.response_id, request.request_id, request.segment.segment_id, request.segment.source
            )
        )
        return actions + self._answer_text(response, text) + self._sync_output()

    # --- transcript and speech ------------------------------------------------------------------

    def _answer_text(self, response: _Response, raw: str) -> list[Action]:
        return self._transcript(response, response.visible.push(raw))

    def _transcript(self, response: _Response, clean: str) -> list[Action]:
        """Visible text (`VisibleText` output: no leading blank, no state or special token) goes out."""
        if not clean:
            return []
        response.text += clean
        actions: list[Action] = [EmitText(response.response_id, clean)]
        if response.audio:
            actions += self._speak(response, response.chunker.push(clean))
        return actions

    def _speak(self, response: _Response, sentences: Iterable[str]) -> list[Action]:
        actions: list[Action] = []
        for raw in sentences:
            text = raw.strip()
            if not text:
                continue
            # Locate the sentence in the transcript so truncation maps audio back onto text exactly;
            # a chunker that rewrites text (e.g. spells out numbers) falls back to its length.
            found = response.text.find(text, response.spoken_chars)
            char_end = (
                found + len(text)
                if found >= 0
                else min(len(response.text), response.spoken_chars + len(text))
            )
            response.spoken_chars = char_end
            sentence = _Sentence(len(response.sentences), text, char_end)
            response.sentences.append(sentence)
            if sentence.index == response.layout_index:
                self._begin_layout(response, sentence)
            actions.append(Speak(response.response_id, sentence.index, text))
        return actions

    def _on_speech_synthesized(self, event: SpeechSynthesized) -> list[Action]:
        response = self._response(event.response_id)
        if response is None or event.sentence_index >= len(response.sentences) or event.num_samples == 0:
            return []
        sentence = response.sentences[event.sentence_index]
        if sentence.finished or sentence.index < response.layout_index:
            return []  # after its SentenceSynthesized: a runtime race, the layout is fixed
        if sentence.index == response.layout_index:
            self._append_audio(response, sentence.index, event.pcm, event.num_samples)
        else:
            sentence.waiting.append((event.pcm, event.num_samples))  # parallel TTS: keep sentence order
        return self._sync_output()

    def _on_sentence_synthesized(self, event: SentenceSynthesized) -> list[Action]:
        response = self._response(event.response_id)
        if response is None or event.sentence_index >= len(response.sentences):
            return []
        response.sentences[event.sentence_index].finished = True
        while response.layout_index < len(response.sentences):
            sentence = response.sentences[response.layout_index]
            if not sentence.finished:
                break
            sentence.audio_end = response.total
            response.layout_index += 1
            if response.layout_index < len(response.sentences):
                self._begin_layout(response, response.sentences[response.layout_index])
        return self._sync_output()

    def _begin_layout(self, response: _Response, sentence: _Sentence) -> None:
        sentence.audio_start = response.total
        for pcm, num_samples in sentence.waiting:
            self._append_audio(response, sentence.index, pcm, num_samples)
        sentence.waiting.clear()

    @staticmethod
    def _append_audio(response: _Response, sentence_index: int, pcm: object, num_samples: int) -> None:
        response.timeline.append(_Chunk(sentence_index, response.total, num_samples, pcm))
        response.starts.append(response.total)
        response.total += num_samples

    # --- output ---------------------------------------------------------------------------------

    def _sync_output(self) -> list[Action]:
        """Bring the current response's output in line with the holds, emit what may be emitted,
        and complete the response if it is done. Called after every change."""
        response = self._current
        if response is None:
            return []
        actions: list[Action] = []
        if response.audio:
            held = bool(self._holds)
            if held and not response.held:
                response.held = True
                if response.cursor > response.played:  # something is in flight: stop it
                    response.pause_sent = True
                    response.pause_replies += 1
                    actions.append(PauseOutput(response.response_id))
            elif not held and response.held:
                response.held = False
                if response.pause_sent:
                    response.pause_sent = False
                    actions.append(ResumeOutput(response.response_id))
            # Emit only once the pause reply told us where the client stopped.
            if not response.held and response.pause_replies == 0:
                actions += self._pump(response)
        return actions + self._maybe_complete(response)

    def _pump(self, response: _Response) -> list[Action]:
        actions: list[Action] = []
        index = bisect.bisect_right(response.starts, response.cursor) - 1
        for chunk in response.timeline[max(index, 0) :]:
            if chunk.end <= response.cursor:
                continue
            offset = response.cursor - chunk.start
            count = chunk.num_samples - offset
            actions.append(EmitAudio(response.response_id, response.cursor, chunk.pcm, count, offset))
            response.cursor += count
        return actions

    def _on_playback_position(self, event: PlaybackPosition) -> list[Action]:
        response = self._response(event.response_id)
        if response is None:
            # The pause reply of an answer cancelled before it came: history learns what was heard.
            if event.reply_to_pause and event.response_id in self._late_positions:
                self._late_positions.discard(event.response_id)
                self._history.truncate(event.response_id, event.played_samples)
            return []
        played = max(response.played, min(event.played_samples, response.cursor))
        response.played = played
        if event.reply_to_pause and response.pause_replies > 0:
            response.pause_replies -= 1
            response.cursor = played  # the client dropped the rest: send it again on resume
        return self._sync_output()

    def _maybe_complete(self, response: _Response) -> list[Action]:
        if response.finish is None:
            return []
        if response.audio and (
            response.layout_index < len(response.sentences) or response.played < response.total
        ):
            return []
        if response.finish == "length":
            return self._finish(response, "incomplete", "max_output_tokens")
        return self._finish(response, "completed", None)

    # --- ending responses -----------------------------------------------------------------------

    def _finish(self, response: _Response, status: ResponseStatus, reason: str | None) -> list[Action]:
        """End the current response: stop its generation and output, tell the client, keep history."""
        actions: list[Action] = []
        if response.request_id is not None and self._requests.pop(response.request_id, None) is not None:
            actions.append(AbortGeneration(response.request_id))
        response.request_id = None
        if response.audio and status in ("cancelled", "failed"):
            actions += [CancelSpeech(response.response_id), ClearOutput(response.response_id)]
        actions.append(ResponseDone(response.response_id, status, reason))
        self._current = None
        self._remember(response, delivered_all=status in ("completed", "incomplete"))
        return actions

    def _remember(self, response: _Response, delivered_all: bool) -> None:
        sentences = tuple(
            SpokenSentence(s.text, s.char_end, s.audio_start, s.audio_end) for s in response.sentences
        )
        self._history.add(
            response.response_id,
            response.user,
            response.prefix,
            response.text,
            sentences,
            has_audio=response.audio,
            played_samples=None if delivered_all else response.played,
        )
        if response.pause_replies > 0 and not delivered_all:
            self._late_positions.add(response.response_id)
        self._late_positions = {rid for rid in self._late_positions if rid in self._history}

    def _on_client_cancel(self, event: ClientCancel) -> list[Action]:
        response = self._current
        if response is None or (event.response_id is not None and event.response_id != response.response_id):
            wanted = event.response_id or "any response"
            return [Error("response_cancel_not_active", f"no active response to cancel ({wanted})")]
        return self._finish(response, "cancelled", "client_cancelled")

    def _on_client_truncate(self, event: ClientTruncate) -> list[Action]:
        samples = event.audio_end_ms * self._settings.output_sample_rate // 1000
        response = self._response(event.response_id)
        if response is not None:
            # The client abandoned this answer's playback at that point (it cleared its buffer):
            # continuing to send would not line up, so the answer ends here.
            response.played = min(samples, response.total)
            response.pause_replies = 0  # the client's word beats any pause reply still on its way
            actions = self._finish(response, "cancelled", "client_cancelled")
            kept = self._history.kept_text(event.response_id)
            if kept is None:
                return actions  # history_turns == 0: nothing kept
            return [*actions, ResponseTruncated(event.response_id, event.audio_end_ms, kept)]
        self._late_positions.discard(event.response_id)
        kept = self._history.truncate(event.response_id, samples)
        if kept is None:
            return [
                Error(
                    "truncate_unknown_response",
                    f"response {event.response_id} is not in the conversation history",
                )
            ]
        return [ResponseTruncated(event.response_id, event.audio_end_ms, kept)]

    # --- settings -------------------------------------------------------------------------------

    def _on_session_updated(self, event: SessionUpdated) -> list[Action]:
        changes = {
            f.name: getattr(event, f.name) for f in fields(event) if getattr(event, f.name) is not None
        }
        if changes.get("instructions") == "":
            changes["instructions"] = None  # "" clears them
        self._settings = replace(self._settings, **changes)
        self._history.resize(self._settings.history_turns)
        if not self._settings.interrupt_response:
            self._holds.clear()  # never hold output again: resume anything held now
        return self._sync_output()

    # --- helpers --------------------------------------------------------------------------------

    def _new_id(self, kind: str) -> str:
        self._counters[kind] += 1
        return f"{self._session_id}-{kind}-{self._counters[kind]}"

    def _new_request(self, engine: int, segment: _Segment, user: tuple[UserPart, ...]) -> _Request:
        request_id = self._new_id("req")
        history_user = tuple(p for p in user if not isinstance(p, InputImage))  # VITA drops history vision
        request = _Request(request_id, self._counters["req"], engine, segment, history_user)
        self._requests[request_id] = request
        return request

    def _open_response(self, request: _Request, prefix: str) -> _Response:
        response = _Response(
            response_id=self._new_id("resp"),
            request_id=request.request_id,
            segment=request.segment,
            user=request.user,
            audio=self._settings.audio_output,
            chunker=self._chunker_factory(),
            visible=self._visible_text(),
            prefix=prefix,
        )
        request.response = response
        self._current = response
        return response

    def _response(self, response_id: str) -> _Response | None:
        current = self._current
        return current if current is not None and current.response_id == response_id else None

    def _hold(self, segment: _Segment) -> None:
        if self._settings.interrupt_response:
            self._holds.add(segment.segment_id)

    def _advance(self, sample: int) -> None:
        self._now = max(self._now, sample)

    def _frames_before(self, end: int) -> tuple[object, ...]:
        """Exactly max_frames camera frames from the window before ``end`` (none if it holds none), as VITA-1.5's
        demo picks them: `np.linspace(0, n - 1, max_frames, dtype=int)`, spread when there are more frames,
        repeated when there are fewer; oldest first."""
        window = [
            f.frame for f in self._frames if end - self._settings.frame_window_samples <= f.sample <= end
        ]
        count = self._settings.max_frames
        if not window or count == 0:
            return ()
        return tuple(window[int(i)] for i in np.linspace(0, len(window) - 1, num=count, dtype=int))

    def _prompt(
        self, user: tuple[UserPart, ...], frames: tuple[object, ...], instructions: str | None
    ) -> TurnPrompt:
        audio = tuple(p.audio for p in user if isinstance(p, InputAudio))
        images = tuple(p.image for p in user if isinstance(p, InputImage))
        texts = [p.text for p in user if isinstance(p, InputText)]
        modality: Modality = "video" if frames else "image" if images else "audio" if audio else "text"
        return TurnPrompt(
            modality=modality,
            audio=audio,
            frames=images + frames,
            text="\n".join(texts) if texts else None,
            history=self._history.turns(),
            instructions=instructions,
        )

    def _visible_text(self) -> VisibleText:
        tokens = self._settings.state_tokens
        states = () if tokens is None else (tokens.query_str, tokens.noise_str, tokens.text_str)
        return VisibleText(extra=(*self._settings.special_texts, *states))

    def _kind_of(self, token_id: int) -> SegmentKind:
        return classify_first_token(token_id, self._settings.state_tokens)

    def _state_text(self, kind: SegmentKind) -> str:
        tokens = self._settings.state_tokens
        return "" if tokens is None else tokens.text_of(kind)

    @staticmethod
    def _classified(
        segment: _Segment, kind: SegmentKind, ignored: bool = False, reason: str | None = None
    ) -> SegmentClassified:
        return SegmentClassified(segment.segment_id, kind, segment.start, segment.end, ignored, reason)

    _HANDLERS: ClassVar[dict[type[Event], Callable[..., list[Action]]]] = {
        SpeechStarted: _on_speech_started,
        SpeechEnded: _on_speech_ended,
        SpeechDiscarded: _on_speech_discarded,
        FrameCaptured: _on_frame,
        TextInput: _on_text_input,
        UserItem: _on_user_item,
        ResponseRequested: _on_response_requested,
        TokenDelta: _on_token_delta,
        GenerationEnded: _on_generation_ended,
        SpeechSynthesized: _on_speech_synthesized,
        SentenceSynthesized: _on_sentence_synthesized,
        PlaybackPosition: _on_playback_position,
        ClientCancel: _on_client_cancel,
        ClientTruncate: _on_client_truncate,
        SessionUpdated: _on_session_updated,
    }
