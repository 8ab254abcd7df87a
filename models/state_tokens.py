"""VITA's state tokens and the visible text of a reply: the one place that knows them.

VITA's first generated token says what the user turn was (research/vita.md §2):

| kind  | meaning                      | VITA-1.5 (Qwen2.5, ordinary BPE tokens) | VITA-1.0 (added tokens) |
|-------|------------------------------|-----------------------------------------|-------------------------|
| query | speech meant for the model   | ☞ 144766                                | <1>                     |
| noise | speech not meant for it      | ☟ 146164                                | <2>                     |
| text  | a typed query                | ☜ 145789                                | <3>                     |

This module holds what every caller (chat completions, the realtime runtime and controller, the CLI)
needs of them:

* `state_token_ids(tokenizer, layout)`: the ids, read from the checkpoint's tokenizer and checked.
* `classify_first_token(token_id, tokens)`: query / noise / text / unknown.
* `reply_token_budget(max_reply_tokens, tokens)`: the state token is generated but never shown, so it
  does not count against a client's token budget.
* `history_state(user_had_audio)` and `split_state_prefix(text, layout)`: history replies carry their
  state token, as VITA was trained (query after speech, text after typing).
* `VisibleText` / `strip_special_tokens`: streamed model text minus state tokens and special tokens
  (``<|im_end|>``, ``</s>``, ...), the same however the stream was split: a tail that may still grow
  into such a token is held back until the next delta decides.

Pure Python: no tokenizer library is imported here (the duplex controller uses this module and stays
free of I/O and heavy imports).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

StateKind = Literal["query", "noise", "text"]
FirstTokenKind = Literal["query", "noise", "text", "unknown"]
STATE_KINDS: tuple[StateKind, ...] = ("query", "noise", "text")

# The state tokens' text per checkpoint layout ("vita15": Qwen2.5, "vita10": Mixtral).
STATE_TOKEN_TEXT: dict[str, dict[str, str]] = {
    "vita15": {"query": "☞", "noise": "☟", "text": "☜"},
    "vita10": {"query": "<1>", "noise": "<2>", "text": "<3>"},
}


class HasStateIds(Protocol):
    """Anything with the three ids (this module's `StateTokens`, `models.config.StateTokens`)."""

    @property
    def query(self) -> int: ...
    @property
    def noise(self) -> int: ...
    @property
    def text(self) -> int: ...


@dataclass(frozen=True)
class StateTokens:
    """Token ids (and their text) of VITA's state tokens. Take the ids from the checkpoint's tokenizer
    (`state_token_ids`)."""

    query: int
    noise: int
    text: int
    query_str: str = "☞"
    noise_str: str = "☟"
    text_str: str = "☜"

    @classmethod
    def vita15(cls) -> StateTokens:
        """VITA-1.5's Qwen2.5 ids (verified on the real tokenizer in tests/test_prompt_ids.py)."""
        return cls(query=144766, noise=146164, text=145789)

    @classmethod
    def vita10(cls, query: int, noise: int, text: int) -> StateTokens:
        """VITA-1.0: <1> <2> <3> are added tokens whose ids only its tokenizer knows."""
        return cls(query, noise, text, "<1>", "<2>", "<3>")

    @classmethod
    def for_layout(cls, layout: str, ids: HasStateIds | Mapping[str, int]) -> StateTokens:
        """The state tokens of a checkpoint layout, from its ids (a mapping or an object with the fields)."""
        if layout not in STATE_TOKEN_TEXT:
            raise ValueError(f"layout must be one of {sorted(STATE_TOKEN_TEXT)}; got {layout!r}")
        get = ids.__getitem__ if isinstance(ids, Mapping) else lambda kind: getattr(ids, kind)
        texts = STATE_TOKEN_TEXT[layout]
        return cls(
            int(get("query")),
            int(get("noise")),
            int(get("text")),
            texts["query"],
            texts["noise"],
            texts["text"],
        )

    def kind_of(self, token_id: int) -> FirstTokenKind:
        return classify_first_token(token_id, self)

    def text_of(self, kind: str) -> str:
        """The token's text for a kind; "" for "unknown"."""
        return {"query": self.query_str, "noise": self.noise_str, "text": self.text_str}.get(kind, "")


def state_token_ids(tokenizer: Any, layout: str) -> dict[str, int]:
    """{"query": id, "noise": id, "text": id} read from the checkpoint's tokenizer.

    Each state token must be exactly one token: an ordinary BPE token in VITA-1.5's Qwen2.5 vocabulary
    (☞ 144766, ☟ 146164, ☜ 145789), an added token in VITA-1.0's tokenizer (<1> <2> <3>). Anything else
    means the tokenizer is not the checkpoint's own, and VITA's replies could not be classified.
    """
    if layout not in STATE_TOKEN_TEXT:
        raise ValueError(f"layout must be one of {sorted(STATE_TOKEN_TEXT)}; got {layout!r}")
    out: dict[str, int] = {}
    for kind, token in STATE_TOKEN_TEXT[layout].items():
        ids = list(tokenizer.encode(token, add_special_tokens=False))
        if len(ids) != 1:
            raise ValueError(
                f"the {layout} state token {token!r} ({kind}) must be one token of the checkpoint's tokenizer; "
                f"it encodes to {len(ids)} tokens {ids}. Is this the checkpoint's own tokenizer"
                + (" (VITA-1.0's has <1> <2> <3> as added tokens)?" if layout == "vita10" else "?")
            )
        out[kind] = int(ids[0])
    if len(set(out.values())) != len(out):
        raise ValueError(f"the {layout} state tokens must have three different ids; got {out}")
    return out


def classify_first_token(token_id: int | None, tokens: HasStateIds | None) -> FirstTokenKind:
    """What VITA's first generated token says: "query", "noise", "text", or "unknown" (not a state token,
    no token at all, or a checkpoint without state tokens)."""
    if tokens is None or token_id is None:
        return "unknown"
    if token_id == tokens.query:
        return "query"
    if token_id == tokens.noise:
        return "noise"
    if token_id == tokens.text:
        return "text"
    return "unknown"


def reply_token_budget(max_reply_tokens: int, tokens: object | None) -> int:
    """Tokens to ask the engine for so the visible reply may have `max_reply_tokens`: one more for the
    state token when the checkpoint has state tokens (generated, never shown, never counted)."""
    if max_reply_tokens < 1:
        raise ValueError(f"max tokens must be >= 1; got {max_reply_tokens}")
    return max_reply_tokens + (1 if tokens is not None else 0)


def history_state(user_had_audio: bool) -> StateKind:
    """The state token an earlier reply gets back in history (clients never saw it): VITA was trained
    with ☞/<1> after a spoken query and ☜/<3> after a typed one."""
    return "query" if user_had_audio else "text"


def split_state_prefix(text: str, layout: str) -> tuple[StateKind | None, str]:
    """(kind, rest) when `text` starts with one of the layout's state tokens, else (None, text)."""
    for kind, token in STATE_TOKEN_TEXT[layout].items():
        if text.startswith(token):
            return kind, text[len(token) :]  # type: ignore[return-value]
    return None, text


# --- visible text ------------------------------------------------------------------------------------

# Never shown nor spoken: the state tokens of both layouts, Llama-style named specials, and ChatML-style
# `<|name|>` tokens (Qwen2.5's <|im_end|>, <|endoftext|>, ...).
HIDDEN_TOKENS: tuple[str, ...] = (
    *(t for texts in STATE_TOKEN_TEXT.values() for t in texts.values()),
    "<s>", "</s>", "<unk>", "<pad>",
)  # fmt: skip
_CHAT_SPECIAL = r"<\|[^<>|\s]{1,40}\|>"
_CHAT_SPECIAL_PARTIAL = r"<(?:\|[^<>|\s]{0,40}\|?)?"


@functools.lru_cache(maxsize=32)
def _patterns(extra: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(hidden, partial): a hidden token anywhere; a tail that is a proper prefix of one (held back)."""
    tokens = sorted({*HIDDEN_TOKENS, *(t for t in extra if t)}, key=len, reverse=True)
    hidden = re.compile("|".join([*(re.escape(t) for t in tokens), _CHAT_SPECIAL]))
    prefixes = sorted({t[:i] for t in tokens for i in range(1, len(t))}, key=len, reverse=True)
    partial = re.compile(
        "(?:" + "|".join([*(re.escape(p) for p in prefixes), _CHAT_SPECIAL_PARTIAL]) + r")\Z"
    )
    return hidden, partial


def strip_special_tokens(text: str, extra: Iterable[str] = ()) -> str:
    """Remove VITA state tokens and special tokens (plus any `extra` strings) from complete text."""
    return _patterns(tuple(extra))[0].sub("", text)


class VisibleText:
    """Streamed model text → what a user may see or hear: no state token, no special token (also when
    one arrives split across deltas), and no blank before the first visible character (VITA often puts
    a space or newline after its state token). The output is the same however the input was split.

    `extra`: more strings to hide (e.g. a deployment's own end-of-turn text). `strip_leading=False` keeps
    leading blanks (for a consumer that trims by itself)."""

    def __init__(self, extra: Iterable[str] = (), *, strip_leading: bool = True) -> None:
        self._hidden, self._partial = _patterns(tuple(extra))
        self._tail = ""  # not yet emitted: at most a hidden token in the making
        self._started = not strip_leading

    @property
    def started(self) -> bool:
        """Whether any visible character was emitted yet."""
        return self._started

    def push(self, text: str) -> str:
        """Add a delta; return the text that is now certainly visible (often all of it)."""
        self._tail += text
        partial = self._partial.search(self._tail)
        cut = partial.start() if partial else len(self._tail)
        for match in self._hidden.finditer(self._tail):  # never cut through a complete hidden token
            if match.start() < cut < match.end():
                cut = match.end()
        return self._emit(cut)

    def flush(self) -> str:
        """The stream ended: whatever was held back is text after all."""
        return self._emit(len(self._tail))

    def _emit(self, cut: int) -> str:
        ready, self._tail = self._tail[:cut], self._tail[cut:]
        piece = self._hidden.sub("", ready)
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        return piece
