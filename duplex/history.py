"""Per-session conversation history with playback-true truncation.

A turn is added when its answer ends (completed, cancelled or failed); noise never gets here. What an
interrupted answer keeps is what the user actually heard: every spoken sentence records the output
sample range of its audio, so a played position (from the pacer, or the client's
``conversation.item.truncate``) maps exactly onto text. Whole sentences fully played are kept, plus the
played fraction of the sentence playing at the cut, cut back to a word boundary (scripts without spaces,
e.g. Chinese, are cut at the character).

If nothing was heard, the turn stays with an empty reply (just the state token). Dropping it would lose
the user's question, which is often the context of the very query that interrupted it ("...and in
French?"); it also matches OpenAI, where truncating to 0 ms keeps the item. The full text and sentence
ranges are kept so a later, better-informed truncation can recompute the cut in either direction.
"""

from __future__ import annotations

import unicodedata
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from duplex.events import HistoryTurn, UserPart


@dataclass(frozen=True)
class SpokenSentence:
    """One sentence sent to TTS: it ends at ``char_end`` of the reply text, and its audio covers output
    samples [audio_start, audio_end) of the response. None: its audio was not (fully) laid out."""

    text: str
    char_end: int
    audio_start: int | None = None
    audio_end: int | None = None


def _is_wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _cut_at_word(piece: str, keep: int) -> str:
    """``piece[:keep]`` without a trailing partial word."""
    if keep >= len(piece):
        return piece
    head = piece[:keep]
    if _is_wide(piece[keep]) or (head and _is_wide(head[-1])):
        return head  # Chinese/Japanese: no spaces, every character is a unit
    if piece[keep].isspace() or (head and head[-1].isspace()):
        return head
    last_space = max((i for i, ch in enumerate(head) if ch.isspace()), default=-1)
    return head[: last_space + 1] if last_space >= 0 else ""


def played_text(text: str, sentences: Sequence[SpokenSentence], played_samples: int) -> str:
    """The part of ``text`` whose audio was played by output sample ``played_samples``."""
    kept_end = 0
    for sentence in sentences:
        start, end = sentence.audio_start, sentence.audio_end
        if start is None or end is None:
            # Not fully synthesized: its length in samples is unknown, so no fraction can be computed;
            # keeping nothing of it errs on the side of not claiming speech the user did not hear.
            break
        if played_samples >= end:
            kept_end = sentence.char_end
            continue
        if played_samples > start:
            piece = text[kept_end : sentence.char_end]
            keep = (len(piece) * (played_samples - start)) // (end - start)
            return (text[:kept_end] + _cut_at_word(piece, keep)).rstrip()
        break
    return text[:kept_end].rstrip()


@dataclass
class _Entry:
    response_id: str
    user: tuple[UserPart, ...]
    prefix: str  # VITA state token of the reply ("" when the checkpoint has none)
    text: str  # the full reply as generated, state token excluded
    sentences: tuple[SpokenSentence, ...]
    has_audio: bool
    kept: str  # what the user got: ``text`` or its played part

    def turn(self) -> HistoryTurn:
        return HistoryTurn(user=self.user, assistant=self.prefix + self.kept)


class History:
    """The last ``max_turns`` turns of one session, oldest first."""

    def __init__(self, max_turns: int) -> None:
        self._entries: deque[_Entry] = deque()
        self._max_turns = 0
        self.resize(max_turns)

    def resize(self, max_turns: int) -> None:
        if max_turns < 0:
            raise ValueError(f"history_turns must be >= 0; got {max_turns}")
        self._max_turns = max_turns
        while len(self._entries) > max_turns:
            self._entries.popleft()

    def clear(self) -> None:
        self._entries.clear()

    def add(
        self,
        response_id: str,
        user: tuple[UserPart, ...],
        prefix: str,
        text: str,
        sentences: tuple[SpokenSentence, ...] = (),
        has_audio: bool = False,
        played_samples: int | None = None,
    ) -> str:
        """Record a finished answer. ``played_samples=None`` keeps all of ``text`` (it was all
        delivered); otherwise only its played part. Returns the kept text."""
        kept = (
            text.strip()
            if played_samples is None or not has_audio
            else played_text(text, sentences, played_samples).strip()
        )
        if self._max_turns == 0:
            return kept
        self._entries.append(_Entry(response_id, user, prefix, text, sentences, has_audio, kept))
        self.resize(self._max_turns)
        return kept

    def truncate(self, response_id: str, played_samples: int) -> str | None:
        """Keep only what was played by ``played_samples``; None if the turn is not (or no longer) here.
        A reply without audio cannot be cut by audio position and stays as it is."""
        entry = self._find(response_id)
        if entry is None:
            return None
        if entry.has_audio:
            entry.kept = played_text(entry.text, entry.sentences, played_samples).strip()
        return entry.kept

    def kept_text(self, response_id: str) -> str | None:
        entry = self._find(response_id)
        return None if entry is None else entry.kept

    def turns(self) -> tuple[HistoryTurn, ...]:
        return tuple(entry.turn() for entry in self._entries)

    def items(self) -> tuple[tuple[str, HistoryTurn], ...]:
        """(response id, turn) pairs, oldest first."""
        return tuple((entry.response_id, entry.turn()) for entry in self._entries)

    def __contains__(self, response_id: object) -> bool:
        return any(entry.response_id == response_id for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _find(self, response_id: str) -> _Entry | None:
        return next((e for e in self._entries if e.response_id == response_id), None)
