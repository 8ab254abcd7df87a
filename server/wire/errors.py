"""Every `error.code` the realtime endpoint sends, in one enum.

Clients branch on these strings, and tests/test_fuzz.py checks each error it provokes against this list,
so a new code is added here first. The duplex controller emits its codes as plain strings (it knows
nothing of the wire); tests/test_wire.py checks that each of them is listed here.
"""

from __future__ import annotations

from enum import StrEnum

from openai.types.realtime import RealtimeError


class ErrorCode(StrEnum):
    # The frame or event itself (client_events.parse_client_event, the socket reader).
    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    MISSING_TYPE = "missing_type"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    INVALID_VALUE = "invalid_value"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    EVENT_TOO_LARGE = "event_too_large"
    UNSUPPORTED_EVENT = "unsupported_event"  # a GA event this transport has no use for (see the README)

    # What a well-formed event asks for (server/realtime.py).
    ENGINES_NOT_READY = "engines_not_ready"
    INVALID_AUDIO_FORMAT = "invalid_audio_format"
    AUDIO_OUTPUT_UNAVAILABLE = "audio_output_unavailable"
    INVALID_AUDIO = "invalid_audio"
    INPUT_AUDIO_BUFFER_FULL = "input_audio_buffer_full"
    INPUT_AUDIO_BUFFER_COMMIT_EMPTY = "input_audio_buffer_commit_empty"
    UNSUPPORTED_ITEM = "unsupported_item"
    INVALID_CONTENT = "invalid_content"
    INVALID_IMAGE = "invalid_image"
    ITEM_NOT_FOUND = "item_not_found"
    ITEM_DELETE_UNSUPPORTED = "item_delete_unsupported"
    INSTRUCTIONS_TOO_LONG = "instructions_too_long"
    STRING_ABOVE_MAX_LENGTH = "string_above_max_length"  # OpenAI's code for a string over its limit
    SESSION_MEMORY_EXCEEDED = "session_memory_exceeded"  # the session holds its budget of frames, audio, items
    TRANSCRIPTION_UNAVAILABLE = "transcription_unavailable"  # session.update asked for it; the server has none

    # The duplex controller's (duplex/controller.py).
    CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE = "conversation_already_has_active_response"
    RESPONSE_CREATE_WITHOUT_INPUT = "response_create_without_input"
    RESPONSE_CANCEL_NOT_ACTIVE = "response_cancel_not_active"
    TRUNCATE_UNKNOWN_RESPONSE = "truncate_unknown_response"
    ENGINE_ERROR = "engine_error"
    # Engine failures with a known cause (models/errors.py: the duplex runtime passes their code on).
    ENGINE_UNAVAILABLE = "engine_unavailable"  # its engine died mid-request; retry (another engine serves)
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the prompt does not fit max_model_len

    @property
    def error_type(self) -> str:
        """OpenAI's `error.type`: the server's fault or the request's."""
        return "server_error" if self in _SERVER_FAULTS else "invalid_request_error"


_SERVER_FAULTS = frozenset({ErrorCode.ENGINES_NOT_READY, ErrorCode.ENGINE_ERROR, ErrorCode.ENGINE_UNAVAILABLE})
_BY_VALUE = {code.value: code for code in ErrorCode}


class ProtocolError(Exception):
    """A client event the server refuses: answered with an `error` event; the session goes on.

    `event_id` is the client's own id of the refused event (GA echoes it in `error.event_id`)."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.event_id = code, message, param, event_id

    def as_error(self) -> RealtimeError:
        return realtime_error(self.code, self.message, self.param, self.event_id)


def realtime_error(
    code: ErrorCode | str, message: str, param: str | None = None, event_id: str | None = None
) -> RealtimeError:
    """The `error` object of an `error` event. A code outside the enum (a new controller code not listed
    yet: tests/test_wire.py fails on it) still goes out, typed as a request error."""
    if not isinstance(code, ErrorCode) and code in _BY_VALUE:
        code = _BY_VALUE[code]
    kind = code.error_type if isinstance(code, ErrorCode) else "invalid_request_error"
    return RealtimeError(type=kind, code=str(code), message=message, param=param, event_id=event_id)
