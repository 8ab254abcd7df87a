"""Errors raised on bad media input. All are ValueError subclasses so callers can catch one type."""


class InvalidMediaError(ValueError):
    """Input media could not be used; the message says what was wrong and what is accepted."""


class InvalidAudioError(InvalidMediaError):
    """Audio was empty, non-finite, or in a format we do not read."""


class InvalidImageError(InvalidMediaError):
    """Image bytes were corrupt, empty, zero-sized, or in a format we do not read."""


class InvalidVideoError(InvalidMediaError):
    """Video could not be decoded or had no frames."""
