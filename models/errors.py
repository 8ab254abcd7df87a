"""Errors the model layer raises: bad media input (all ValueError subclasses, so callers can catch one type),
and engine requests that failed for a reason a caller reports by a stable `code`."""


class InvalidMediaError(ValueError):
    """Input media could not be used; the message says what was wrong and what is accepted."""


class InvalidAudioError(InvalidMediaError):
    """Audio was empty, non-finite, or in a format we do not read."""


class InvalidImageError(InvalidMediaError):
    """Image bytes were corrupt, empty, zero-sized, or in a format we do not read."""


class InvalidVideoError(InvalidMediaError):
    """Video could not be decoded or had no frames."""


class EngineRequestError(Exception):
    """An engine request failed for a known reason; `code` names it for the client (the wire's error code)
    and the message is written for the client too."""

    code = "engine_error"


class EngineUnavailableError(EngineRequestError, RuntimeError):
    """The engine's process died (the server restarts it): this request is lost, and a retry may succeed
    at once where another engine serves, or once the restart is done. The server's fault, not the client's."""

    code = "engine_unavailable"


class PromptTooLongError(EngineRequestError, ValueError):
    """The prompt (media placeholders expanded, when the count comes from vLLM) does not fit the model's
    context with room for one generated token. The client's fault: shorter input, instructions or history."""

    code = "context_length_exceeded"

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt is {tokens} tokens; this model's context is {limit} tokens (max_model_len), including "
            "at least one token of answer: shorten the input, the instructions or the history"
        )
        self.tokens, self.limit = tokens, limit
