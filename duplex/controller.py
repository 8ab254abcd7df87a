"""The duplex policy of one session, as a sans-I/O state table (in the manner of h11's ``_state.py``).

``DuplexController.handle(event) -> list[Action]``: no asyncio, no clock, no engine, TTS or socket calls.
A runtime feeds it VAD, engine, TTS, pacer and client events (`duplex.events`) and carries out the
actions it returns, in order.

* Two roles: the *generator* engine answers; the *monitor* engine takes each new user turn as a *probe*
  (one-engine mode: both are requests on engine 0). VITA's first token is a state token: ☞/<1> query,
  ☟/<2> noise, ☜/<3> text query. Noise → abort the probe; nothing is said or kept. Query → the probe
  *becomes* the answer (no second prefill), the old answer is cancelled (``turn_detected``), roles swap.
* Barge-in: speech or typed text *holds* the output while an answer is audible. The first hold sends
  `PauseOutput`; the pacer replies with the played position and output rewinds there, so a noise verdict
  resumes with nothing lost and a query verdict cancels with an exact played position.
* Speech out: transcript deltas go out as they come, sentences go to TTS, their audio is laid out on the
  answer's output timeline (`duplex.timeline`). An answer with audio completes once generation stopped,
  every sentence was synthesized and the client played it all (the pacer says so), not when the audio
  was merely sent: a barge-in during the tail can still pause or truncate it.
* History (`duplex.history`) keeps what the user actually heard.

States: an event is judged by the state of what it is about.

* `Turn`, the user's side: IDLE → SPEAKING (a VAD segment is open) → CLASSIFYING (a probe awaits VITA's
  verdict). Speech, frame, text, item and settings events key on it; a probe's engine events key on
  CLASSIFYING, the state of the turn it judges.
* `Answer`: NONE → [FIRST_TOKEN →] STREAMING → DRAINING → NONE. Response requests, cancels, truncations
  and the answer's engine events key on it.
* `Output`, the answer's audio: PLAYING, HELD or PAUSED; SILENT without audio. TTS and playback events
  key on it. The holds move it after every event (state-triggered, as in h11), in `_sync_output`.
* `Ended`: the request or response the event names is over, or never was.

`TRANSITIONS[(state, event type)]` names the handler; `LATE` holds the pairs of expected late output,
which are dropped. Any other pair is a runtime bug: `IllegalTransition`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any, Literal, Protocol

from duplex.events import (
    AbortGeneration,
    Action,
    CancelSpeech,
    ClearOutput,
    ClientCancel,
    ClientTruncate,
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
from duplex.history import History
from duplex.sentences import SentenceChunker
from duplex.timeline import FrameWindow, SpeechTimeline
from models.state_tokens import StateTokens, VisibleText, classify_first_token

__all__ = [
    "LATE",
    "TRANSITIONS",
    "Answer",
    "Chunker",
    "ControllerSettings",
    "DuplexController",
    "Ended",
    "IllegalTransition",
    "Output",
    "StateTokens",
    "Turn",
]

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


class Chunker(Protocol):
    """Cuts streamed text into sentences to speak (`duplex.sentences.SentenceChunker`)."""

    def push(self, delta: str) -> list[str]: ...

    def flush(self) -> list[str]: ...


# --- the states ---------------------------------------------------------------------------------


class Turn(Enum):
    IDLE = "idle"
    SPEAKING = "speaking"  # a VAD segment is open (it holds the output)
    CLASSIFYING = "classifying"  # a probe awaits VITA's first token (it holds the output)


class Answer(Enum):
    NONE = "none"
    FIRST_TOKEN = "first_token"  # a forced answer learns its state token from its first token
    STREAMING = "streaming"  # generating: transcript and sentences go out
    DRAINING = "draining"  # generation stopped; the last sentences are synthesized and played


class Output(Enum):
    SILENT = "silent"  # no answer, or a text-only one
    PLAYING = "playing"  # audio goes out (once every pause reply is in)
    HELD = "held"  # held by the user while nothing was in flight: the client was not told
    PAUSED = "paused"  # held with a PauseOutput in effect: a ResumeOutput is owed


class Ended(Enum):
    REQUEST = "request_ended"  # finished, aborted or unknown request id
    RESPONSE = "response_ended"  # a response that is not the current one


State = Turn | Answer | Output | Ended


class IllegalTransition(RuntimeError):
    """An event that cannot happen in the state it is about: the runtime broke the event protocol
    (`duplex.events`). Client input never raises it; it gets `Error` actions."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(
            f"{type(event).__name__} is not allowed in state {type(state).__name__}.{state.name}: "
            f"{event!r}; the allowed pairs are duplex.controller.TRANSITIONS and LATE"
        )
        self.state = state
        self.event = event


_LIVE = (Answer.FIRST_TOKEN, Answer.STREAMING, Answer.DRAINING)
_AUDIBLE = (Output.PLAYING, Output.HELD, Output.PAUSED)

# (state of what the event is about, event type) -> DuplexController method.
TRANSITIONS: dict[tuple[State, type[Event]], str] = {
    # the user's turn
    (Turn.IDLE, SpeechStarted): "_open_speech",
    (Turn.CLASSIFYING, SpeechStarted): "_open_speech",
    (Turn.SPEAKING, SpeechStarted): "_repeated_start",  # changes nothing
    (Turn.SPEAKING, SpeechEnded): "_close_speech",
    (Turn.IDLE, SpeechEnded): "_close_speech",  # a segment whose start the echo gate withheld
    (Turn.CLASSIFYING, SpeechEnded): "_close_speech",
    (Turn.SPEAKING, SpeechDiscarded): "_drop_speech",
    (Turn.IDLE, SpeechDiscarded): "_drop_unannounced",  # its start was never announced
    (Turn.CLASSIFYING, SpeechDiscarded): "_drop_unannounced",
    **{(turn, FrameCaptured): "_frame" for turn in Turn},
    **{(turn, TextInput): "_text_turn" for turn in Turn},
    **{(turn, UserItem): "_user_item" for turn in Turn},
    **{(turn, SessionUpdated): "_update_session" for turn in Turn},
    # VITA's verdict on a turn: its probe's first token
    (Turn.CLASSIFYING, TokenDelta): "_classify",
    (Turn.CLASSIFYING, GenerationEnded): "_probe_ended",
    # the answer
    (Answer.NONE, ResponseRequested): "_respond",
    **{(answer, ResponseRequested): "_respond_busy" for answer in _LIVE},
    (Answer.FIRST_TOKEN, TokenDelta): "_first_token",
    (Answer.STREAMING, TokenDelta): "_answer_delta",
    (Answer.FIRST_TOKEN, GenerationEnded): "_answer_ended",
    (Answer.STREAMING, GenerationEnded): "_answer_ended",
    (Answer.NONE, ClientCancel): "_cancel_nothing",
    **{(answer, ClientCancel): "_cancel" for answer in _LIVE},
    **{(answer, ClientTruncate): "_truncate_answer" for answer in _LIVE},
    (Ended.RESPONSE, ClientTruncate): "_truncate_history",
    # its output
    **{(output, SpeechSynthesized): "_audio" for output in _AUDIBLE},
    **{(output, SentenceSynthesized): "_sentence_done" for output in _AUDIBLE},
    **{(output, PlaybackPosition): "_played" for output in Output},
    (Ended.RESPONSE, PlaybackPosition): "_late_played",  # a late pause reply still corrects history
}

# Expected late output of what is over: dropped.
LATE: frozenset[tuple[State, type[Event]]] = frozenset(
    {
        (Ended.REQUEST, TokenDelta),  # in flight when we aborted the request
        (Ended.REQUEST, GenerationEnded),  # the engine confirming our AbortGeneration
        (Ended.RESPONSE, SpeechSynthesized),  # TTS on its way when the answer ended
        (Ended.RESPONSE, SentenceSynthesized),
    }
)


# --- per-session data ---------------------------------------------------------------------------


@dataclass
class _Segment:
    """One user turn: a speech segment, a typed text or a manual turn."""

    segment_id: str
    source: TurnSource
    start: int | None = None
    end: int | None = None


@dataclass
class _Response:
    response_id: str
    request_id: str | None  # None once its generation ended
    user: tuple[UserPart, ...]
    chunker: Chunker
    visible: VisibleText  # raw model text -> transcript (no state/special tokens, even split ones)
    state: Answer
    output: Output
    prefix: str = ""  # state token text, as it goes into history
    text: str = ""  # transcript so far
    speech: SpeechTimeline | None = None  # None: text only
    pause_replies: int = 0  # PauseOutput replies not yet received: audio waits for the rewind
    finish: FinishReason | None = None  # how generation stopped (DRAINING)


@dataclass
class _Request:
    request_id: str
    seq: int  # creation order: newer probes supersede older ones
    engine: int
    segment: _Segment
    user: tuple[UserPart, ...]  # what goes into history (vision dropped)
    response: _Response | None = None  # None: a probe; set once it answers


# --- the controller -----------------------------------------------------------------------------


class DuplexController:
    """One session's duplex policy. Ids are ``{session_id}-req-N``, ``-resp-N``, ``-seg-N``."""

    def __init__(
        self,
        settings: ControllerSettings | None = None,
        *,
        session_id: str = "s",
        chunker_factory: Callable[[], Chunker] = SentenceChunker,
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
        self._speech: _Segment | None = None  # the open speech segment (SpeechStarted seen)
        self._holds: set[str] = set()  # segment ids holding the output
        self._frames = FrameWindow(self._settings.max_frames, self._settings.frame_window_samples)
        self._pending_user: list[UserPart] = []  # user items awaiting ResponseRequested
        self._late_positions: set[str] = set()  # cancelled while a pause reply was owed
        self._now = 0  # latest input sample seen

    # --- state ----------------------------------------------------------------------------------

    @property
    def turn(self) -> Turn:
        if self._speech is not None:
            return Turn.SPEAKING
        probing = any(r.response is None for r in self._requests.values())
        return Turn.CLASSIFYING if probing else Turn.IDLE

    @property
    def answer(self) -> Answer:
        return Answer.NONE if self._current is None else self._current.state

    @property
    def output(self) -> Output:
        return Output.SILENT if self._current is None else self._current.output

    def held(self) -> list[object]:
        """The inputs this session holds on to: camera frames, user parts awaiting a response, those of
        requests in flight and those of the history (an object may repeat). What a memory budget counts."""
        held: list[object] = self._frames.held()
        held += self._pending_user
        for request in self._requests.values():
            held += request.user
        for turn in self._history.turns():
            held += turn.user
        return held

    def state_of(self, event: Event) -> State:
        """The state of what ``event`` is about: its key in `TRANSITIONS`."""
        match event:
            case TokenDelta() | GenerationEnded():
                request = self._requests.get(event.request_id)
                if request is None:
                    return Ended.REQUEST
                return Turn.CLASSIFYING if request.response is None else request.response.state
            case SpeechSynthesized() | SentenceSynthesized() | PlaybackPosition():
                response = self._response(event.response_id)
                return Ended.RESPONSE if response is None else response.output
            case ClientTruncate():
                response = self._response(event.response_id)
                return Ended.RESPONSE if response is None else response.state
            case ResponseRequested() | ClientCancel():
                return self.answer
            case SpeechStarted() | SpeechEnded() | SpeechDiscarded() | FrameCaptured():
                return self.turn
            case TextInput() | UserItem() | SessionUpdated():
                return self.turn
        raise ValueError(f"not a duplex event: {type(event).__name__}")

    def handle(self, event: Event) -> list[Action]:
        state = self.state_of(event)
        handler = _HANDLERS.get((state, type(event)))
        if handler is not None:
            return handler(self, event)
        if (state, type(event)) in LATE:
            return []
        raise IllegalTransition(state, event)

    # --- read-only views ------------------------------------------------------------------------

    @property
    def settings(self) -> ControllerSettings:
        return self._settings

    @property
    def history(self) -> History:
        return self._history

    # --- the user's turn ------------------------------------------------------------------------

    def _open_speech(self, event: SpeechStarted) -> list[Action]:
        self._advance(event.sample)
        self._speech = _Segment(self._new_id("seg"), "speech", start=event.sample)
        self._hold(self._speech)
        return [*self._sync_output(), SpeechStartedNotice(self._speech.segment_id, event.sample)]

    def _repeated_start(self, event: SpeechStarted) -> list[Action]:
        self._advance(event.sample)
        return []

    def _close_speech(self, event: SpeechEnded) -> list[Action]:
        self._advance(event.end_sample)
        segment = self._speech or _Segment(self._new_id("seg"), "speech")
        self._speech = None
        segment.start, segment.end = event.start_sample, event.end_sample
        actions: list[Action] = [SpeechStoppedNotice(segment.segment_id, event.end_sample)]
        user: tuple[UserPart, ...] = (InputAudio(event.audio),)
        frames = self._frames.before(event.end_sample)
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

    def _drop_speech(self, event: SpeechDiscarded) -> list[Action]:
        self._advance(event.end_sample)
        segment, self._speech = self._speech, None
        assert segment is not None
        self._holds.discard(segment.segment_id)
        notice = SpeechStoppedNotice(segment.segment_id, event.end_sample, committed=False)
        return [*self._sync_output(), notice]

    def _drop_unannounced(self, event: SpeechDiscarded) -> list[Action]:
        self._advance(event.end_sample)
        return []

    def _frame(self, event: FrameCaptured) -> list[Action]:
        self._advance(event.sample)
        self._frames.add(event.frame, event.sample, self._now)
        return []

    def _text_turn(self, event: TextInput) -> list[Action]:
        segment = _Segment(self._new_id("seg"), "text")
        frames = self._frames.before(self._now)
        return self._start_probe(segment, (InputText(event.text),), frames, self._settings.instructions)

    def _user_item(self, event: UserItem) -> list[Action]:
        self._pending_user.extend(event.parts)
        return []

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

    # --- VITA's verdict -------------------------------------------------------------------------

    def _classify(self, event: TokenDelta) -> list[Action]:
        if not event.token_ids:
            return []
        request = self._requests[event.request_id]
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
        heard = tuple(p.audio for p in request.user if isinstance(p, InputAudio))  # for the transport's transcript
        actions: list[Action] = [self._classified(request.segment, kind, audio=heard)]
        # Older probes still waiting are superseded: the user has moved on past them.
        for older in [r for r in self._requests.values() if r.response is None and r.seq < request.seq]:
            actions += self._reject(older, "unknown", "superseded")
        if self._current is not None:
            actions += self._finish(self._current, "cancelled", "turn_detected")
        self._holds.discard(request.segment.segment_id)
        if request.engine != self._generator:  # two engines: the monitor that heard it answers
            self._generator, self._monitor = request.engine, self._generator
            actions.append(RolesSwapped(self._generator, self._monitor))
        response = self._open_response(request, Answer.STREAMING, prefix=self._state_text(kind))
        segment = request.segment
        actions.append(
            ResponseStarted(response.response_id, request.request_id, segment.segment_id, segment.source)
        )
        return actions + self._answer_text(response, text) + self._sync_output()

    def _probe_ended(self, event: GenerationEnded) -> list[Action]:
        """A probe ended before its first token."""
        request = self._requests.pop(event.request_id)
        self._holds.discard(request.segment.segment_id)
        if event.reason == "error":
            notice: Action = Error(event.code, _failure(event, "probe"))
        else:
            notice = self._classified(request.segment, "unknown", ignored=True, reason="no_output")
        return [notice, *self._sync_output()]

    # --- the answer -----------------------------------------------------------------------------

    def _respond(self, event: ResponseRequested) -> list[Action]:
        if not self._pending_user:
            need = "response.create needs a user item first (conversation.item.create or committed audio)"
            return [Error("response_create_without_input", need)]
        user, self._pending_user = tuple(self._pending_user), []
        segment = _Segment(self._new_id("seg"), "manual")
        frames = self._frames.before(self._now)
        instructions = event.instructions if event.instructions is not None else self._settings.instructions
        if not event.force:
            return self._start_probe(segment, user, frames, instructions)
        # Forced: answer on the (idle) generator whatever the first token says.
        request = self._new_request(self._generator, segment, user)
        prompt = self._prompt(user, frames, instructions)
        actions: list[Action] = [StartGeneration(request.request_id, request.engine, prompt, "answer")]
        first = Answer.STREAMING if self._settings.state_tokens is None else Answer.FIRST_TOKEN
        response = self._open_response(request, first, prefix="")
        actions.append(
            ResponseStarted(response.response_id, request.request_id, segment.segment_id, "manual")
        )
        return actions + self._sync_output()

    def _respond_busy(self, event: ResponseRequested) -> list[Action]:
        assert self._current is not None
        message = f"response {self._current.response_id} is still active; cancel it first"
        return [Error("conversation_already_has_active_response", message)]

    def _first_token(self, event: TokenDelta) -> list[Action]:
        response = self._answering(event.request_id)
        if event.token_ids:
            response.state = Answer.STREAMING
            response.prefix = self._state_text(self._kind_of(event.token_ids[0]))
        return self._answer_text(response, event.text)

    def _answer_delta(self, event: TokenDelta) -> list[Action]:
        return self._answer_text(self._answering(event.request_id), event.text)

    def _answer_ended(self, event: GenerationEnded) -> list[Action]:
        response = self._answering(event.request_id)
        del self._requests[event.request_id]
        response.request_id = None
        if event.reason in ("stop", "length"):
            response.state, response.finish = Answer.DRAINING, event.reason
            actions = self._transcript(response, response.visible.flush())  # a held tail was text after all
            if response.speech is not None:
                actions += self._speak(response, response.chunker.flush())
            return actions + self._sync_output()
        if event.reason == "error":
            if event.code == "context_length_exceeded":
                # The turn does not fit with the history before it: neither is kept, so the next turn starts
                # from an empty history (as OpenAI's "auto" truncation drops the oldest items) instead of
                # every later prompt overflowing too.
                self._history.clear()
                return [*self._finish(response, "failed", event.code, remember=False),
                        Error(event.code, _failure(event, "generation") + "; the conversation history was cleared")]
            return [*self._finish(response, "failed", event.code), Error(event.code, _failure(event, "generation"))]
        return self._finish(response, "failed", "engine_aborted")  # an abort we did not ask for

    def _answer_text(self, response: _Response, raw: str) -> list[Action]:
        return self._transcript(response, response.visible.push(raw))

    def _transcript(self, response: _Response, clean: str) -> list[Action]:
        """Visible text (`VisibleText` output: no leading blank, no state or special token) goes out."""
        if not clean:
            return []
        response.text += clean
        actions: list[Action] = [EmitText(response.response_id, clean)]
        if response.speech is not None:
            actions += self._speak(response, response.chunker.push(clean))
        return actions

    def _speak(self, response: _Response, sentences: Iterable[str]) -> list[Action]:
        assert response.speech is not None
        actions: list[Action] = []
        for text in (s.strip() for s in sentences):
            if text:
                index = response.speech.add_sentence(response.text, text)
                actions.append(Speak(response.response_id, index, text))
        return actions

    def _cancel(self, event: ClientCancel) -> list[Action]:
        response = self._current
        assert response is not None
        if event.response_id is not None and event.response_id != response.response_id:
            return self._cancel_nothing(event)
        return self._finish(response, "cancelled", "client_cancelled")

    def _cancel_nothing(self, event: ClientCancel) -> list[Action]:
        wanted = event.response_id or "any response"
        return [Error("response_cancel_not_active", f"no active response to cancel ({wanted})")]

    def _truncate_answer(self, event: ClientTruncate) -> list[Action]:
        # The client abandoned this answer's playback at that point (it cleared its buffer):
        # continuing to send would not line up, so the answer ends here.
        response = self._current
        assert response is not None
        if response.speech is not None:
            response.speech.truncate(self._ms_to_samples(event.audio_end_ms))
        response.pause_replies = 0  # the client's word beats any pause reply still on its way
        actions = self._finish(response, "cancelled", "client_cancelled")
        kept = self._history.kept_text(event.response_id)
        if kept is None:
            return actions  # history_turns == 0: nothing kept
        return [*actions, ResponseTruncated(event.response_id, event.audio_end_ms, kept)]

    def _truncate_history(self, event: ClientTruncate) -> list[Action]:
        self._late_positions.discard(event.response_id)
        kept = self._history.truncate(event.response_id, self._ms_to_samples(event.audio_end_ms))
        if kept is None:
            message = f"response {event.response_id} is not in the conversation history"
            return [Error("truncate_unknown_response", message)]
        return [ResponseTruncated(event.response_id, event.audio_end_ms, kept)]

    def _finish(
        self, response: _Response, status: ResponseStatus, reason: str | None, *, remember: bool = True
    ) -> list[Action]:
        """End the current answer: stop its generation and output, tell the client, keep history (unless
        not `remember`: a turn that cannot fit the context would make every later prompt too long too)."""
        actions: list[Action] = []
        if response.request_id is not None and self._requests.pop(response.request_id, None) is not None:
            actions.append(AbortGeneration(response.request_id))
        response.request_id = None
        if response.speech is not None and status in ("cancelled", "failed"):
            actions += [CancelSpeech(response.response_id), ClearOutput(response.response_id)]
        actions.append(ResponseDone(response.response_id, status, reason))
        self._current = None
        delivered_all = status in ("completed", "incomplete")
        speech = response.speech
        if not remember:
            return actions
        self._history.add(
            response.response_id,
            response.user,
            response.prefix,
            response.text,
            () if speech is None else speech.spoken(),
            has_audio=speech is not None,
            played_samples=None if delivered_all else 0 if speech is None else speech.played,
        )
        if response.pause_replies > 0 and not delivered_all:
            self._late_positions.add(response.response_id)
        self._late_positions = {rid for rid in self._late_positions if rid in self._history}
        return actions

    # --- its output -----------------------------------------------------------------------------

    def _audio(self, event: SpeechSynthesized) -> list[Action]:
        added = self._speaking(event.response_id).add_audio(
            event.sentence_index, event.pcm, event.num_samples
        )
        return self._sync_output() if added else []

    def _sentence_done(self, event: SentenceSynthesized) -> list[Action]:
        finished = self._speaking(event.response_id).finish_sentence(event.sentence_index)
        return self._sync_output() if finished else []

    def _played(self, event: PlaybackPosition) -> list[Action]:
        response = self._current
        assert response is not None
        if response.speech is not None:  # (a pacer may report nothing played of a text-only answer)
            response.speech.report_played(event.played_samples)
            if event.reply_to_pause and response.pause_replies > 0:
                response.pause_replies -= 1
                response.speech.rewind()  # the client dropped the rest: send it again on resume
        return self._sync_output()

    def _late_played(self, event: PlaybackPosition) -> list[Action]:
        # The pause reply of an answer cancelled before it came: history learns what was heard.
        if event.reply_to_pause and event.response_id in self._late_positions:
            self._late_positions.discard(event.response_id)
            self._history.truncate(event.response_id, event.played_samples)
        return []

    def _sync_output(self) -> list[Action]:
        """The output's transitions, triggered by the holds after every event: PLAYING → PAUSED (or HELD
        when nothing was in flight) → PLAYING. Audio goes out while PLAYING once every pause reply told
        where the client stopped; then the answer completes if it is done."""
        response = self._current
        if response is None:
            return []
        actions: list[Action] = []
        held = bool(self._holds)
        if response.output is Output.PLAYING and held:
            assert response.speech is not None
            if response.speech.in_flight:  # something is on its way to the client: stop it
                response.output = Output.PAUSED
                response.pause_replies += 1
                actions.append(PauseOutput(response.response_id))
            else:
                response.output = Output.HELD
        elif response.output is Output.HELD and not held:
            response.output = Output.PLAYING
        elif response.output is Output.PAUSED and not held:
            response.output = Output.PLAYING
            actions.append(ResumeOutput(response.response_id))
        if response.output is Output.PLAYING and response.pause_replies == 0:
            assert response.speech is not None
            actions += response.speech.emit(response.response_id)
        return actions + self._maybe_complete(response)

    def _maybe_complete(self, response: _Response) -> list[Action]:
        if response.state is not Answer.DRAINING:
            return []
        if response.speech is not None and not response.speech.done:
            return []
        if response.finish == "length":
            return self._finish(response, "incomplete", "max_output_tokens")
        return self._finish(response, "completed", None)

    # --- settings -------------------------------------------------------------------------------

    def _update_session(self, event: SessionUpdated) -> list[Action]:
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

    def _open_response(self, request: _Request, state: Answer, prefix: str) -> _Response:
        audio = self._settings.audio_output
        response = _Response(
            response_id=self._new_id("resp"),
            request_id=request.request_id,
            user=request.user,
            chunker=self._chunker_factory(),
            visible=self._visible_text(),
            state=state,
            output=Output.PLAYING if audio else Output.SILENT,
            prefix=prefix,
            speech=SpeechTimeline() if audio else None,
        )
        request.response = response
        self._current = response
        return response

    def _response(self, response_id: str) -> _Response | None:
        current = self._current
        return current if current is not None and current.response_id == response_id else None

    def _answering(self, request_id: str) -> _Response:
        response = self._requests[request_id].response
        assert response is not None
        return response

    def _speaking(self, response_id: str) -> SpeechTimeline:
        response = self._response(response_id)
        assert response is not None and response.speech is not None
        return response.speech

    def _hold(self, segment: _Segment) -> None:
        if self._settings.interrupt_response:
            self._holds.add(segment.segment_id)

    def _advance(self, sample: int) -> None:
        self._now = max(self._now, sample)

    def _ms_to_samples(self, ms: int) -> int:
        return ms * self._settings.output_sample_rate // 1000

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
        segment: _Segment, kind: SegmentKind, ignored: bool = False, reason: str | None = None,
        audio: tuple[object, ...] = (),
    ) -> SegmentClassified:
        return SegmentClassified(segment.segment_id, kind, segment.start, segment.end, ignored, reason, audio)


# The table's method names, resolved once (a misspelt name fails at import).
_HANDLERS: dict[tuple[State, type[Event]], Callable[[DuplexController, Any], list[Action]]] = {
    key: getattr(DuplexController, name) for key, name in TRANSITIONS.items()
}


def _failure(event: GenerationEnded, what: str) -> str:
    """The client's message for a failed request: a known reason's own text (it names the limit or says to
    retry), else which request failed and the engine's words."""
    if event.code != "engine_error" and event.error:
        return event.error
    return f"{what} {event.request_id} failed: {event.error or 'unknown'}"
