"""Time as sample counts, for the duplex controller (`duplex.controller`): one answer's speech on its
output timeline, and the camera frames of the input stream.

`SpeechTimeline`: the sentences of one response go to TTS in order and may be synthesized in parallel,
but their audio is laid out strictly in sentence order (a later sentence's chunks wait until every
earlier sentence is finished). Each sentence thus covers one range of output samples, so a played
position maps back onto text exactly (`duplex.history.played_text`). Three positions, in output samples
from the response's first: ``total`` laid out, ``cursor`` handed to the runtime (rewound to ``played``
when a pause reply says where the client stopped) and ``played`` by the client as reported.

`FrameWindow`: camera frames by input sample (16 kHz), and the frames of a turn picked as VITA-1.5's demo
picks them.

Pure: no clock, no I/O; audio and frames are opaque objects that are only stored and handed back.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from duplex.events import EmitAudio
from duplex.history import SpokenSentence

__all__ = ["FrameWindow", "SpeechTimeline"]


@dataclass
class _Chunk:
    start: int  # output sample of the response
    num_samples: int
    pcm: object

    @property
    def end(self) -> int:
        return self.start + self.num_samples


@dataclass
class _Sentence:
    text: str
    char_end: int  # the sentence ends at text[:char_end] of the transcript
    audio_start: int | None = None
    audio_end: int | None = None
    finished: bool = False  # TTS reported SentenceSynthesized
    waiting: list[tuple[object, int]] = field(default_factory=list)  # chunks before its turn to lay out


class SpeechTimeline:
    """One response's sentences and their audio on its output timeline."""

    def __init__(self) -> None:
        self._sentences: list[_Sentence] = []
        self._spoken_chars = 0  # transcript[:_spoken_chars] went to TTS
        self._layout = 0  # the sentence whose audio is being appended
        self._chunks: list[_Chunk] = []
        self._starts: list[int] = []  # chunk starts, for bisect
        self.total = 0  # output samples laid out
        self.cursor = 0  # output samples handed to the runtime
        self.played = 0  # output samples the client played, as reported

    @property
    def in_flight(self) -> bool:
        """Audio was handed out that the client has not reported played."""
        return self.cursor > self.played

    @property
    def done(self) -> bool:
        """Every sentence is synthesized and laid out, and the client played all of it."""
        return self._layout == len(self._sentences) and self.played >= self.total

    def add_sentence(self, transcript: str, text: str) -> int:
        """``text`` (a sentence of ``transcript``, after what was spoken already) goes to TTS; returns its
        index. It is located in the transcript so truncation maps audio back onto text exactly; a
        chunker that rewrites text (e.g. spells out numbers) falls back to its length."""
        found = transcript.find(text, self._spoken_chars)
        if found >= 0:
            char_end = found + len(text)
        else:
            char_end = min(len(transcript), self._spoken_chars + len(text))
        self._spoken_chars = char_end
        sentence = _Sentence(text, char_end)
        self._sentences.append(sentence)
        if len(self._sentences) - 1 == self._layout:
            self._begin(sentence)
        return len(self._sentences) - 1

    def add_audio(self, index: int, pcm: object, num_samples: int) -> bool:
        """TTS audio of sentence ``index``. False when it is dropped: an unknown sentence, no samples, or
        a chunk after the sentence's end (a runtime race: the layout is fixed by then)."""
        if index >= len(self._sentences) or num_samples == 0:
            return False
        sentence = self._sentences[index]
        if sentence.finished or index < self._layout:
            return False
        if index == self._layout:
            self._append(pcm, num_samples)
        else:
            sentence.waiting.append((pcm, num_samples))  # parallel TTS: keep sentence order
        return True

    def finish_sentence(self, index: int) -> bool:
        """TTS finished sentence ``index``; False for an unknown sentence."""
        if index >= len(self._sentences):
            return False
        self._sentences[index].finished = True
        while self._layout < len(self._sentences) and self._sentences[self._layout].finished:
            self._sentences[self._layout].audio_end = self.total
            self._layout += 1
            if self._layout < len(self._sentences):
                self._begin(self._sentences[self._layout])
        return True

    def emit(self, response_id: str) -> list[EmitAudio]:
        """Hand out everything laid out past the cursor."""
        actions: list[EmitAudio] = []
        index = bisect.bisect_right(self._starts, self.cursor) - 1
        for chunk in self._chunks[max(index, 0) :]:
            if chunk.end <= self.cursor:
                continue
            offset = self.cursor - chunk.start
            count = chunk.num_samples - offset
            actions.append(EmitAudio(response_id, self.cursor, chunk.pcm, count, offset))
            self.cursor += count
        return actions

    def report_played(self, played_samples: int) -> None:
        """The client played this far (never beyond what it was sent, never backwards)."""
        self.played = max(self.played, min(played_samples, self.cursor))

    def rewind(self) -> None:
        """The client dropped what it had not played: hand it out again from there."""
        self.cursor = self.played

    def truncate(self, played_samples: int) -> None:
        """The client says it played exactly this far and abandoned the rest."""
        self.played = min(played_samples, self.total)

    def spoken(self) -> tuple[SpokenSentence, ...]:
        """The sentences with their audio ranges, for history."""
        return tuple(SpokenSentence(s.text, s.char_end, s.audio_start, s.audio_end) for s in self._sentences)

    def _begin(self, sentence: _Sentence) -> None:
        sentence.audio_start = self.total
        for pcm, num_samples in sentence.waiting:
            self._append(pcm, num_samples)
        sentence.waiting.clear()

    def _append(self, pcm: object, num_samples: int) -> None:
        self._chunks.append(_Chunk(self.total, num_samples, pcm))
        self._starts.append(self.total)
        self.total += num_samples


class FrameWindow:
    """Recent camera frames by input sample. ``max_frames`` per turn, from the ``window_samples`` before
    the turn's end."""

    def __init__(self, max_frames: int, window_samples: int) -> None:
        self._max_frames = max_frames
        self._window = window_samples
        self._frames: deque[tuple[int, object]] = deque(maxlen=max(32, 8 * max_frames))

    def add(self, frame: object, sample: int, now: int) -> None:
        """A frame taken at input ``sample``; ``now`` is the latest input sample seen."""
        self._frames.append((sample, frame))
        # Keep two windows: a turn's window ends at its end sample, which lags the stream a little.
        oldest = now - 2 * self._window
        while self._frames and self._frames[0][0] < oldest:
            self._frames.popleft()

    def held(self) -> list[object]:
        """Every frame kept (for a memory budget)."""
        return [frame for _, frame in self._frames]

    def before(self, end: int) -> tuple[object, ...]:
        """Exactly max_frames frames from the window before ``end`` (none if it holds none), as VITA-1.5's
        demo picks them: `np.linspace(0, n - 1, max_frames, dtype=int)`, spread when there are more
        frames, repeated when there are fewer; oldest first."""
        window = [frame for sample, frame in self._frames if end - self._window <= sample <= end]
        if not window or self._max_frames == 0:
            return ()
        return tuple(window[int(i)] for i in np.linspace(0, len(window) - 1, num=self._max_frames, dtype=int))
