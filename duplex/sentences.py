"""Cut streamed LLM text into chunks to speak.

Text-to-speech wants whole sentences (prosody), but waiting for the first full sentence delays the
first audio. `SentenceChunker` therefore cuts at sentence ends, and for the first chunk of a response
also at a clause break (comma, semicolon, colon) once a few words have arrived. It avoids cutting
inside numbers ("3.14", "1,000") and after common abbreviations ("e.g.", "Mr."), and removes VITA's
state tokens (☞ ☟ ☜ <1> <2> <3>) and special tokens (<|im_end|>, </s>, ...) so they are never spoken
(`models.state_tokens.VisibleText`, also when a token arrives split across deltas).

Pure: no I/O, no clock. Feeding the text in any split gives the same chunks as feeding it whole.
"""

from __future__ import annotations

import re

from models.state_tokens import VisibleText, strip_special_tokens

__all__ = ["ABBREVIATIONS", "SentenceChunker", "strip_special_tokens"]

# Sentence ends: ASCII ones need whitespace after (so "3.14" and "e.g.x" never match); CJK ones and
# newlines do not. Closing quotes/brackets stay with their sentence.
_CLOSERS = "\"'”’)]」』》"
_CLOSERS_CLASS = "[" + re.escape(_CLOSERS) + "]*"
_SENTENCE_RE = re.compile(rf"[.!?…]+{_CLOSERS_CLASS}(?=\s)|[。！？]+{_CLOSERS_CLASS}|\n")
_CLAUSE_RE = re.compile(r"[,;:]+(?=\s)|[，；：、]")
_NEXT_CHAR_RE = re.compile(r"\s*(\S)")
_LAST_WORD_RE = re.compile(r"(\S+)\Z")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD_RE = re.compile(r"\w")

# Lower-cased words that end with a period without ending the sentence.
ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "al",
        "approx", "fig", "figs", "no", "vol", "ch", "pp", "inc", "ltd", "co", "corp",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    }
)  # fmt: skip


def _word_count(text: str) -> int:
    # CJK scripts have no spaces: count each character as a word.
    cjk = len(_CJK_RE.findall(text))
    rest = _CJK_RE.sub(" ", text).split()
    return cjk + sum(1 for w in rest if _WORD_RE.search(w))


def _is_abbreviation(text: str, dot: int) -> bool:
    """True when the '.' at ``dot`` most likely belongs to an abbreviation or initial."""
    m = _LAST_WORD_RE.search(text, 0, dot)
    if m is None:
        return False
    word = m.group(1).lstrip("\"'“‘([")
    if not word:
        return False
    low = word.lower()
    # "e.g", "U.S": inner dots; "J": a single-letter initial
    return low in ABBREVIATIONS or "." in word or (len(word) == 1 and word.isalpha())


class SentenceChunker:
    """Streamed text deltas in, speakable chunks out.

    ``first_chunk_min_words`` / ``first_chunk_min_chars``: the first chunk may end at a clause break
    once it has at least this many words and characters (a CJK character counts as one word and two
    characters). ``max_chunk_chars``: with no boundary within this many characters, cut at the last
    clause break or space before it, so a run-on sentence cannot hold the voice back forever.
    """

    def __init__(
        self,
        first_chunk_min_chars: int = 10,
        first_chunk_min_words: int = 3,
        max_chunk_chars: int = 250,
    ) -> None:
        if max_chunk_chars < 1:
            raise ValueError("max_chunk_chars must be >= 1")
        self.first_chunk_min_chars = first_chunk_min_chars
        self.first_chunk_min_words = first_chunk_min_words
        self.max_chunk_chars = max_chunk_chars
        self.reset()

    def reset(self) -> None:
        """Start a new response (the next chunk is a 'first chunk' again)."""
        self._visible = VisibleText(strip_leading=False)  # holds back a special token in the making
        self._text = ""  # cleaned text not yet emitted
        self._first = True

    def push(self, delta: str) -> list[str]:
        """Add a text delta; return the chunks it completed (often none)."""
        self._text += self._visible.push(delta)
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the response: return everything left (0 or more chunks) and reset."""
        self._text += self._visible.flush()
        chunks = self._drain(final=True)
        tail = self._text.strip()
        if _WORD_RE.search(tail):
            chunks.append(tail)
        self.reset()
        return chunks

    # ---------------------------------------------------------------------------------------------

    def _drain(self, final: bool) -> list[str]:
        chunks: list[str] = []
        while True:
            cut = self._find_cut(final)
            if cut is None:
                return chunks
            chunk, self._text = self._text[:cut].strip(), self._text[cut:].lstrip()
            if _WORD_RE.search(chunk):  # punctuation-only pieces are not worth a TTS call
                chunks.append(chunk)
                self._first = False

    def _find_cut(self, final: bool) -> int | None:
        """End index of the next chunk, or None to wait for more text."""
        text = self._text
        window = text[: self.max_chunk_chars + 1]
        candidates: list[tuple[int, int, bool]] = []  # (start, end, is_sentence_end)
        candidates += [(m.start(), m.end(), True) for m in _SENTENCE_RE.finditer(window)]
        if self._first:
            candidates += [(m.start(), m.end(), False) for m in _CLAUSE_RE.finditer(window)]
        for start, end, sentence in sorted(candidates):
            if end > self.max_chunk_chars:
                break
            if not sentence:
                head = text[:end]
                chars = len(head) + len(_CJK_RE.findall(head))
                if _word_count(head) >= self.first_chunk_min_words and chars >= self.first_chunk_min_chars:
                    return end
                continue
            punct = text[start:end].rstrip(_CLOSERS)
            if not set(punct) <= {".", "…"}:
                return end  # newline, ! ? or a CJK full stop: always a sentence end
            # Periods/ellipses: decide from the word before and the next visible character.
            if punct == "." and _is_abbreviation(text, start):
                continue
            nxt = _NEXT_CHAR_RE.match(text, end)
            if nxt is None:
                return end if final else None  # only whitespace so far: wait for the next word
            if nxt.group(1).islower():
                continue  # "... so" / "approx. five": the sentence goes on
            return end
        if len(text) > self.max_chunk_chars:
            return self._forced_cut(text[: self.max_chunk_chars])
        return None

    def _forced_cut(self, head: str) -> int:
        clause = [m.end() for m in _CLAUSE_RE.finditer(head)]
        if clause and clause[-1] > len(head) // 2:
            return clause[-1]
        space = head.rfind(" ")
        return space if space > 0 else len(head)
