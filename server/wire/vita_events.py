"""VITA's own server events, under the `vita.` prefix, in the style of `openai.types.realtime`.

Unlike OpenAI's models (which allow extra fields, to stay forward compatible), these forbid them: we
define the format, so a field that is not declared here is a bug. They say earlier or more precisely
what GA events also show (a barge-in pauses the answer; a segment was noise), so a GA-only client can do
without them, and a strict one (the OpenAI Agents SDK validates every event against the GA union and
reports unknown types as errors) connects with `?vita_events=0` and gets none.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class VitaEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: str
    """The unique ID of the server event."""


class SegmentClassified(VitaEvent):
    """VITA's first token on a user turn: is it a query, noise, or something else?"""

    type: Literal["vita.segment.classified"]
    item_id: str
    """The user item (speech segment) this is about."""
    kind: Literal["query", "noise", "text", "unknown"]
    ignored: bool
    """True when no answer comes of it; `reason` says why (noise, a response in progress, ...)."""
    reason: str | None = None
    audio_start_ms: int | None = None
    """Where the segment starts in the input audio stream; absent for typed or manual turns."""
    audio_end_ms: int | None = None


class SegmentDiscarded(VitaEvent):
    """The VAD dropped the segment (shorter than the minimum speech length): it is not a turn."""

    type: Literal["vita.segment.discarded"]
    item_id: str


class OutputPaused(VitaEvent):
    """Barge-in: stop playing this response now and drop what is buffered."""

    type: Literal["vita.output.paused"]
    response_id: str


class OutputResumed(VitaEvent):
    """The barge-in was not a question: the response goes on from where playback stopped."""

    type: Literal["vita.output.resumed"]
    response_id: str


class RolesSwapped(VitaEvent):
    """The engines swapped roles (generator answers, monitor listens) for a new answer."""

    type: Literal["vita.roles.swapped"]
    generator: int
    monitor: int


class Notice(VitaEvent):
    """How the model takes the user's input, when the client should know: `demo_model` (the embedded CPU
    demo), `hears_through_transcription` (the model has no trained audio tower: it answers the transcript
    of what was said), `input_dropped` (the model cannot see: a turn's images or video were left out and
    the rest was answered). `message` says it in words a page can show."""

    type: Literal["vita.notice"]
    code: Literal["demo_model", "hears_through_transcription", "input_dropped"]
    message: str
    response_id: str | None = None
    """The answer it concerns (input_dropped), when there is one."""


VitaServerEvent = SegmentClassified | SegmentDiscarded | OutputPaused | OutputResumed | RolesSwapped | Notice

# Client events VITA adds (models in client_events.py), and the server events above: advertised in the
# README's "VITA extensions" table.
VITA_CLIENT_EVENTS = ("vita.frame.append", "vita.text.append")
VITA_SERVER_EVENTS: dict[str, type[VitaEvent]] = {
    "vita.segment.classified": SegmentClassified,
    "vita.segment.discarded": SegmentDiscarded,
    "vita.output.paused": OutputPaused,
    "vita.output.resumed": OutputResumed,
    "vita.roles.swapped": RolesSwapped,
    "vita.notice": Notice,
}
