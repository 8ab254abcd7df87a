"""Events into, and actions out of, the sans-I/O duplex controller (`duplex.controller`).

Everything here is a frozen dataclass and carries only data: the controller never calls anything, it
returns actions that a runtime carries out, and the runtime reports what happened as events.

Time is data: input positions are 16 kHz sample counts of the microphone stream; output positions are
sample counts at the output rate (``ControllerSettings.output_sample_rate``) counted from the start of
one response's audio. Audio, PCM chunks, camera frames and images are opaque objects the controller only
stores and hands back.

Naming: input events are plain nouns/verbs of what happened (`SpeechEnded`, `TokenDelta`); actions are
imperatives for the runtime (`StartGeneration`, `EmitAudio`); `Notice` actions are client-facing facts
that the transport turns into protocol events (`ResponseDone` → ``response.done``).

Malformed events raise when they are built (``ValueError`` for a bad value such as a negative sample
count or an unknown finish reason, ``TypeError`` for a wrong type), so a runtime bug is reported where it
happens, not deep inside the policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["probe", "answer"]
Modality = Literal["audio", "text", "image", "video"]
FinishReason = Literal["stop", "length", "abort", "error"]
SegmentKind = Literal["query", "noise", "text", "unknown"]
ResponseStatus = Literal["completed", "cancelled", "incomplete", "failed"]
TurnSource = Literal["speech", "text", "manual"]

_FINISH_REASONS = ("stop", "length", "abort", "error")


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (a sample count); got {value!r}")


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str; got {value!r}")


# --- user content -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputAudio:
    """A clip of user speech (16 kHz, opaque to the controller)."""

    audio: object = field(repr=False)


@dataclass(frozen=True)
class InputText:
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"InputText.text must be a str; got {type(self.text).__name__}")


@dataclass(frozen=True)
class InputImage:
    """An image the client sent explicitly (``input_image``); opaque to the controller."""

    image: object = field(repr=False)


UserPart = InputAudio | InputText | InputImage
_USER_PARTS = (InputAudio, InputText, InputImage)


@dataclass(frozen=True)
class HistoryTurn:
    """One past exchange. ``assistant`` starts with VITA's state token (☞/☜, <1>/<3>) as in training,
    and holds only what the user actually heard when the answer was cut off. Vision is not kept: VITA
    drops history images (research/vita.md §3-4)."""

    user: tuple[UserPart, ...]
    assistant: str


@dataclass(frozen=True)
class TurnPrompt:
    """What one generation request must contain; the runtime renders it with VITA's chat template.

    ``modality`` picks the system prompt: "video" for camera frames, "image" for explicit images,
    "audio" for speech, "text" otherwise. ``audio`` holds one clip per spoken segment (normally one;
    manual turns may collect several). ``frames`` are the images of this turn, placed before the audio
    or text as VITA was trained. ``history`` is oldest first.
    """

    modality: Modality
    audio: tuple[object, ...] = field(default=(), repr=False)
    frames: tuple[object, ...] = field(default=(), repr=False)
    text: str | None = None
    history: tuple[HistoryTurn, ...] = ()
    instructions: str | None = None


# --- input events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base class of everything the runtime feeds to `DuplexController.handle`."""


@dataclass(frozen=True)
class SpeechStarted(Event):
    """VAD: speech began at input ``sample``."""

    sample: int

    def __post_init__(self) -> None:
        _check_count("SpeechStarted.sample", self.sample)


@dataclass(frozen=True)
class SpeechEnded(Event):
    """VAD: a segment closed. ``audio`` covers [start_sample, end_sample) incl. prefix padding."""

    start_sample: int
    end_sample: int
    audio: object = field(repr=False)

    def __post_init__(self) -> None:
        _check_count("SpeechEnded.start_sample", self.start_sample)
        _check_count("SpeechEnded.end_sample", self.end_sample)
        if self.end_sample < self.start_sample:
            raise ValueError(f"SpeechEnded: end_sample {self.end_sample} < start_sample {self.start_sample}")


@dataclass(frozen=True)
class SpeechDiscarded(Event):
    """VAD: the segment that `SpeechStarted` opened was too short and was dropped."""

    start_sample: int
    end_sample: int

    def __post_init__(self) -> None:
        _check_count("SpeechDiscarded.start_sample", self.start_sample)
        _check_count("SpeechDiscarded.end_sample", self.end_sample)
        if self.end_sample < self.start_sample:
            raise ValueError(
                f"SpeechDiscarded: end_sample {self.end_sample} < start_sample {self.start_sample}"
            )


@dataclass(frozen=True)
class FrameCaptured(Event):
    """A camera frame taken at input ``sample`` (stream time)."""

    frame: object = field(repr=False)
    sample: int

    def __post_init__(self) -> None:
        _check_count("FrameCaptured.sample", self.sample)


@dataclass(frozen=True)
class TextInput(Event):
    """Typed text: a text query, gated like speech (VITA should answer ☜ / <3>)."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"TextInput.text must be a non-blank str; got {self.text!r}")


@dataclass(frozen=True)
class UserItem(Event):
    """A user message added by the client (``conversation.item.create``); never answered by itself."""

    parts: tuple[UserPart, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.parts, tuple) or not self.parts:
            raise ValueError("UserItem.parts must be a non-empty tuple of InputAudio/InputText/InputImage")
        for part in self.parts:
            if not isinstance(part, _USER_PARTS):
                raise TypeError(
                    f"UserItem.parts accepts InputAudio, InputText, InputImage; got {type(part).__name__}"
                )


@dataclass(frozen=True)
class ResponseRequested(Event):
    """``response.create``: answer the pending user items. ``force`` (the default) answers whatever
    VITA's first token says; ``force=False`` gates it like a spoken segment (noise → no answer)."""

    instructions: str | None = None
    force: bool = True


@dataclass(frozen=True)
class TokenDelta(Event):
    """New tokens of one generation request; ``text`` is their detokenized text (specials included)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str

    def __post_init__(self) -> None:
        _check_id("TokenDelta.request_id", self.request_id)
        if not isinstance(self.token_ids, tuple):
            raise TypeError(
                f"TokenDelta.token_ids must be a tuple of ints; got {type(self.token_ids).__name__}"
            )
        if not isinstance(self.text, str):
            raise TypeError(f"TokenDelta.text must be a str; got {type(self.text).__name__}")


@dataclass(frozen=True)
class GenerationEnded(Event):
    """A generation request finished. "abort" after our `AbortGeneration` is expected and ignored.

    For reason "error", ``code`` says why for the client ("engine_error"; "engine_unavailable": the engine
    died; "context_length_exceeded": the prompt does not fit) and ``error`` is the message."""

    request_id: str
    reason: FinishReason
    error: str | None = None
    code: str = "engine_error"

    def __post_init__(self) -> None:
        _check_id("GenerationEnded.request_id", self.request_id)
        if self.reason not in _FINISH_REASONS:
            raise ValueError(f"GenerationEnded.reason must be one of {_FINISH_REASONS}; got {self.reason!r}")


@dataclass(frozen=True)
class SpeechSynthesized(Event):
    """TTS produced ``num_samples`` output samples (``pcm``, opaque) of one sentence of a response.
    Chunks of one sentence arrive in order; sentences may be synthesized in parallel."""

    response_id: str
    sentence_index: int
    pcm: object = field(repr=False)
    num_samples: int

    def __post_init__(self) -> None:
        _check_id("SpeechSynthesized.response_id", self.response_id)
        _check_count("SpeechSynthesized.sentence_index", self.sentence_index)
        _check_count("SpeechSynthesized.num_samples", self.num_samples)


@dataclass(frozen=True)
class SentenceSynthesized(Event):
    """TTS finished one sentence (all its `SpeechSynthesized` chunks were reported before)."""

    response_id: str
    sentence_index: int

    def __post_init__(self) -> None:
        _check_id("SentenceSynthesized.response_id", self.response_id)
        _check_count("SentenceSynthesized.sentence_index", self.sentence_index)


@dataclass(frozen=True)
class PlaybackPosition(Event):
    """How many output samples of a response the client has played.

    ``reply_to_pause=True``: the answer to a `PauseOutput` (exactly one per PauseOutput, even if the
    response ended meanwhile); the client dropped everything after this point, so output rewinds here.
    ``reply_to_pause=False``: a progress report. The pacer must send one when it has delivered all the
    audio emitted so far (played == emitted end): a response with audio completes only once played.
    """

    response_id: str
    played_samples: int
    reply_to_pause: bool = True

    def __post_init__(self) -> None:
        _check_id("PlaybackPosition.response_id", self.response_id)
        _check_count("PlaybackPosition.played_samples", self.played_samples)


@dataclass(frozen=True)
class ClientCancel(Event):
    """``response.cancel`` (optionally for one response id)."""

    response_id: str | None = None


@dataclass(frozen=True)
class ClientTruncate(Event):
    """``conversation.item.truncate``: the client played only ``audio_end_ms`` of a response."""

    response_id: str
    audio_end_ms: int

    def __post_init__(self) -> None:
        _check_id("ClientTruncate.response_id", self.response_id)
        _check_count("ClientTruncate.audio_end_ms", self.audio_end_ms)


@dataclass(frozen=True)
class SessionUpdated(Event):
    """``session.update``: each field that is not None replaces the current setting.
    ``instructions=""`` clears the session instructions."""

    interrupt_response: bool | None = None
    create_response: bool | None = None
    history_turns: int | None = None
    no_state_token_policy: Literal["answer", "ignore"] | None = None
    audio_output: bool | None = None  # applies to responses started afterwards
    instructions: str | None = None


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """Base class of everything `DuplexController.handle` returns. Carry them out in list order."""


@dataclass(frozen=True)
class StartGeneration(Action):
    """Start ``request_id`` on engine ``engine``. A "probe" may later become the answer without a new
    request; report its output with `TokenDelta` and its end with `GenerationEnded`."""

    request_id: str
    engine: int
    prompt: TurnPrompt
    role: Role


@dataclass(frozen=True)
class AbortGeneration(Action):
    """Abort the request on its engine. Its late `TokenDelta`/`GenerationEnded` are ignored."""

    request_id: str


@dataclass(frozen=True)
class Speak(Action):
    """Synthesize one sentence; report `SpeechSynthesized` chunks then `SentenceSynthesized`."""

    response_id: str
    sentence_index: int
    text: str


@dataclass(frozen=True)
class CancelSpeech(Action):
    """Stop synthesizing this response; its late chunks are dropped anyway."""

    response_id: str


@dataclass(frozen=True)
class EmitAudio(Action):
    """Send ``pcm[offset : offset + num_samples]`` to the client; its first sample is sample
    ``start_sample`` of the response. ``offset`` is non-zero only after a rewind into a chunk."""

    response_id: str
    start_sample: int
    pcm: object = field(repr=False)
    num_samples: int
    offset: int = 0


@dataclass(frozen=True)
class EmitText(Action):
    """Transcript delta of the answer (state and special tokens removed)."""

    response_id: str
    delta: str


@dataclass(frozen=True)
class PauseOutput(Action):
    """Stop sending this response's audio now and tell the client to drop what it buffered; then
    report `PlaybackPosition(reply_to_pause=True)` with what the client played."""

    response_id: str


@dataclass(frozen=True)
class ResumeOutput(Action):
    """Sending may continue; the controller re-emits audio from the reported played position."""

    response_id: str


@dataclass(frozen=True)
class ClearOutput(Action):
    """Drop everything queued for this response, here and at the client (it was cancelled)."""

    response_id: str


# --- client-facing notices ----------------------------------------------------------------------


@dataclass(frozen=True)
class Notice(Action):
    """An action that is only news for the client (the transport maps it to a protocol event)."""


@dataclass(frozen=True)
class SpeechStartedNotice(Notice):
    segment_id: str
    sample: int


@dataclass(frozen=True)
class SpeechStoppedNotice(Notice):
    """``committed=False``: the VAD discarded the segment (too short)."""

    segment_id: str
    sample: int
    committed: bool = True


@dataclass(frozen=True)
class SegmentClassified(Notice):
    """VITA's first token on a user turn. ``ignored``: no answer came of it (``reason`` says why:
    "noise", "response_in_progress", "superseded", "no_state_token", "no_output"). Samples are None
    for typed or manual turns."""

    segment_id: str
    kind: SegmentKind
    start_sample: int | None = None
    end_sample: int | None = None
    ignored: bool = False
    reason: str | None = None
    # The turn's speech (opaque clips), so the transport can transcribe the user item it commits.
    audio: tuple[object, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class ResponseStarted(Notice):
    response_id: str
    request_id: str
    segment_id: str
    source: TurnSource


@dataclass(frozen=True)
class ResponseDone(Notice):
    """``reason``: None (completed), "max_output_tokens" (incomplete), "turn_detected" or
    "client_cancelled" (cancelled), "engine_error", "engine_unavailable", "context_length_exceeded" or
    "engine_aborted" (failed)."""

    response_id: str
    status: ResponseStatus
    reason: str | None = None


@dataclass(frozen=True)
class ResponseTruncated(Notice):
    """History now keeps only ``text`` (no state token) of the response (``conversation.item.truncated``)."""

    response_id: str
    audio_end_ms: int
    text: str


@dataclass(frozen=True)
class InputDropped(Notice):
    """The model cannot understand part of a turn (its config says that tower is untrained): ``count``
    items of ``modality`` were left out of request ``request_id``, which answers the rest."""

    request_id: str
    modality: Literal["image", "video"]
    count: int


@dataclass(frozen=True)
class RolesSwapped(Notice):
    generator: int
    monitor: int


@dataclass(frozen=True)
class SpeechStopped(Notice):
    """The runtime (not the controller) reports that the speech synthesis of a cancelled answer has stopped:
    ``after_s`` seconds from the `CancelSpeech` (the verdict that ended the answer: a barge-in's ☞, a client
    cancel) to the TTS's stream closed. A backend stops its work in that close (the vita voice aborts its
    decoder request in vLLM there), so this bounds how long a sentence nobody will hear keeps running."""

    response_id: str
    after_s: float


@dataclass(frozen=True)
class Error(Notice):
    """A recoverable problem; the session keeps going."""

    code: str
    message: str
