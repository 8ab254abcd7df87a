"""VITA's prompts as token ids, exactly as upstream VITA builds them.

Upstream (`vita/conversation.py`, `vita/util/mm_utils.py::tokenizer_image_audio_token`,
`video_audio_demo.py`) renders the whole conversation to ONE string, splits it at `<image>` / `<audio>`
and tokenizes each text chunk between placeholders as one string, `tokenizer(chunk).input_ids` (special
tokens added, special-token strings such as `<|im_start|>` and `</s>` parsed). When the first chunk
starts with BOS (VITA-1.0's Llama-style tokenizer adds one to every call), the first token of every later
text chunk is dropped, so BOS appears once ("the offset rule"). We do the same, with one placeholder id
per image / audio item taken from the checkpoint config (`image_token_index`, `audio_token_index`:
embedding rows no text can produce; the engine repeats them per feature).

Templates (research/vita.md §2):

    vita15 (Qwen2p5Instruct): <|im_start|>system\\n{system}<|im_end|>\\n
                              <|im_start|>user\\n{message}<|im_end|>\\n
                              <|im_start|>assistant\\n{state}{reply}<|im_end|>\\n ... <|im_start|>assistant\\n
    vita10 (MixtralTwo):      system:{system}</s>\\nuser:{message}</s>\\nbot:{state}{reply}</s> ... \\nbot:

A user message is `<image>`×k, then "\\n" when k > 0, then the text, then `<audio>`×n (upstream's
`video_audio_demo.py`; video frames are k images). History replies keep the state token VITA generated
first (`Turn.state`), as it was trained.

Our one deliberate difference: text that comes from outside (the system prompt, which clients may
override, user text, and a history reply after its state token) never becomes a special token or a
placeholder. A chunk is tokenized exactly as upstream unless such an untrusted span contains (or
touches) an added-token string of the tokenizer (`<|im_end|>`, `</s>`, `<2>`, ...) or `<image>` /
`<audio>` / `<video>`. Only then that chunk is tokenized with the untrusted spans as plain text: the
template's own special tokens keep their ids, the text between them goes through the tokenizer's
normalizer, pre-tokenizer and model without its added-token matching. Upstream would turn such typed
text into turn boundaries, state tokens or placeholders.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .state_tokens import STATE_KINDS, STATE_TOKEN_TEXT, StateKind

if TYPE_CHECKING:
    from .config import VitaConfig

Modality = Literal["text", "audio", "image", "video"]

_SYSTEM_HEAD = (
    "You are an AI robot and your name is VITA. \n"
    "- You are a multimodal large language model developed by the open source community. "
    "Your aim is to be helpful, honest and harmless. \n"
    "- You support the ability to communicate fluently and answer user questions in multiple languages "
    "of the user's choice. \n"
    "- If the user corrects the wrong answer you generated, you will apologize and discuss the correct "
    "answer with the user."
)
_SYSTEM_VISION = (
    " \n- You must answer the question strictly according to the content of the {0} given by the user, "
    "and it is strictly forbidden to answer the question without the content of the {0}. "
    "Please note that you are seeing the {0}, not the {1}."
)
# VITA's three system prompts: image, video, and language (text or speech only).
SYSTEM_PROMPTS: dict[str, str] = {
    "image": _SYSTEM_HEAD + _SYSTEM_VISION.format("image", "video"),
    "video": _SYSTEM_HEAD + _SYSTEM_VISION.format("video", "image"),
    "language": _SYSTEM_HEAD,
}

# Upstream's placeholder strings; in untrusted text they are plain text here.
PLACEHOLDER_TEXTS = ("<image>", "<audio>", "<video>")

_CACHE_ENTRIES = 512  # chunk strings: system prompt + template text repeat every turn
_CACHE_MAX_CHARS = 8192


class Tokenizer(Protocol):
    """What is used of a Hugging Face tokenizer."""

    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ..., **kwargs: Any) -> list[int]: ...
    def get_added_vocab(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class Turn:
    """One chat turn. Media are counted here; the items themselves travel beside the prompt.

    `state`: for an assistant turn, the state token VITA generated first (query / noise / text); it is
    rendered before `text` as in training (`models.state_tokens.history_state` picks it for replies
    whose state token a client never saw). `text` itself is always plain text."""

    role: Literal["user", "assistant"]
    text: str = ""
    images: int = 0
    audios: int = 0
    state: StateKind | None = None

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"a turn's role must be 'user' or 'assistant'; got {self.role!r}")
        if self.state is not None and (self.role != "assistant" or self.state not in STATE_KINDS):
            raise ValueError(f"state must be one of {STATE_KINDS} on an assistant turn; got {self.state!r}")
        if self.role == "assistant" and (self.images or self.audios):
            raise ValueError("assistant turns carry text only")
        if self.images < 0 or self.audios < 0:
            raise ValueError("images and audios count items: they must be >= 0")


@dataclass(frozen=True)
class _Text:
    text: str
    trusted: bool  # template text: its special-token strings are special tokens


@dataclass(frozen=True)
class _Placeholder:
    modality: Literal["image", "audio"]


_Segment = _Text | _Placeholder


def _template(text: str) -> _Text:
    return _Text(text, trusted=True)


def _untrusted(text: str) -> _Text:
    return _Text(text, trusted=False)


@dataclass
class PromptBuilder:
    """Builds prompt token ids for one checkpoint (its layout, tokenizer and placeholder ids)."""

    tokenizer: Tokenizer
    config: VitaConfig
    _cache: OrderedDict[str, tuple[int, ...]] = field(default_factory=OrderedDict, init=False, repr=False)
    # The server builds long prompts in worker threads and short ones on the event loop: the cache is shared.
    _cache_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.config.layout not in STATE_TOKEN_TEXT:
            raise ValueError(f"layout must be one of {sorted(STATE_TOKEN_TEXT)}; got {self.config.layout!r}")
        added = {str(k): int(v) for k, v in self.tokenizer.get_added_vocab().items() if k}
        self._added = added
        by_length = sorted(added, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in by_length)) if by_length else None
        self._dangerous = tuple(sorted({*added, *PLACEHOLDER_TEXTS}, key=len, reverse=True))
        self._longest = max(len(t) for t in self._dangerous)
        # What `add_special_tokens=True` adds around a text (Llama-style: BOS before; Qwen2.5: nothing).
        plain = list(self.tokenizer.encode("a", add_special_tokens=False))
        full = list(self.tokenizer.encode("a", add_special_tokens=True))
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                self._prefix, self._suffix = full[:i], full[i + len(plain) :]
                break
        bos = self.tokenizer.bos_token_id
        # Upstream's offset rule keys on "the first chunk starts with BOS". We apply it only when the
        # tokenizer adds that BOS itself (VITA-1.0's does, Qwen2.5 has none): a tokenizer whose BOS is
        # also template text (SmolLM2's <|im_start|>) would otherwise lose real tokens.
        self._bos: int | None = bos if bos is not None and self._prefix[:1] == [bos] else None

    def system_prompt(self, modality: Modality) -> str:
        return SYSTEM_PROMPTS["language" if modality in ("text", "audio") else modality]

    def build(self, turns: Sequence[Turn], *, modality: Modality, system: str | None = None) -> list[int]:
        """Prompt ids for `turns` (the last one the user's), ending where the assistant speaks."""
        chunks = self._chunks(self._segments(turns, modality, system))
        ids: list[int] = []
        offset = 0
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, _Placeholder):
                attr = "image_token_index" if chunk.modality == "image" else "audio_token_index"
                ids.append(int(getattr(self.config, attr)))
                continue
            chunk_ids = self._chunk_ids(chunk)
            if index == 0:
                offset = 1 if self._bos is not None and chunk_ids[:1] == [self._bos] else 0
                ids.extend(chunk_ids)
            else:
                ids.extend(chunk_ids[offset:])  # upstream drops the first token whatever it is
        return ids

    def render(self, turns: Sequence[Turn], *, modality: Modality, system: str | None = None) -> str:
        """The prompt as upstream's one string, with `<image>` / `<audio>` where placeholders go (logs,
        debugging; `build` never parses this string)."""
        return "".join(
            s.text if isinstance(s, _Text) else f"<{s.modality}>"
            for s in self._segments(turns, modality, system)
        )

    # -- templates -----------------------------------------------------------------------------

    def _segments(self, turns: Sequence[Turn], modality: Modality, system: str | None) -> list[_Segment]:
        if not turns or turns[-1].role != "user":
            raise ValueError("a prompt must end with a user turn")
        system_text = self.system_prompt(modality) if system is None else system
        if self.config.layout == "vita10":
            return self._mixtral_two(turns, system_text)
        return self._qwen2p5_instruct(turns, system_text)

    def _qwen2p5_instruct(self, turns: Sequence[Turn], system: str) -> list[_Segment]:
        out: list[_Segment] = [
            _template("<|im_start|>system\n"),
            _untrusted(system),
            _template("<|im_end|>\n"),
        ]
        for turn in turns:
            out.append(_template(f"<|im_start|>{turn.role}\n"))
            out += self._content(turn)
            out.append(_template("<|im_end|>\n"))
        out.append(_template("<|im_start|>assistant\n"))
        return out

    def _mixtral_two(self, turns: Sequence[Turn], system: str) -> list[_Segment]:
        out: list[_Segment] = [_template("system:"), _untrusted(system), _template("</s>")]
        for turn in turns:
            out.append(_template("\nuser:" if turn.role == "user" else "\nbot:"))
            out += self._content(turn)
            out.append(_template("</s>"))
        out.append(_template("\nbot:"))
        return out

    def _content(self, turn: Turn) -> list[_Segment]:
        if turn.role == "assistant":
            out: list[_Segment] = []
            if turn.state is not None:
                out.append(_template(STATE_TOKEN_TEXT[self.config.layout][turn.state]))
            out.append(_untrusted(turn.text))
            return out
        # Upstream's order (video_audio_demo.py): images (or video frames), "\n", the text, then audio.
        out = [_Placeholder("image")] * turn.images
        if turn.images:
            out.append(_template("\n"))
        out.append(_untrusted(turn.text))
        out += [_Placeholder("audio")] * turn.audios
        return out

    @staticmethod
    def _chunks(segments: list[_Segment]) -> list[list[_Text] | _Placeholder]:
        """Text runs between placeholders, as upstream's split; runs are kept even when empty."""
        chunks: list[list[_Text] | _Placeholder] = [[]]
        for segment in segments:
            if isinstance(segment, _Placeholder):
                chunks += [segment, []]
            elif segment.text:
                last = chunks[-1]
                assert isinstance(last, list)
                last.append(segment)
        return chunks

    # -- tokenization --------------------------------------------------------------------------

    def _chunk_ids(self, chunk: list[_Text]) -> list[int]:
        text = "".join(s.text for s in chunk)
        if not self._untrusted_is_plain(chunk, text):
            return self._plain_untrusted_ids(chunk)
        with self._cache_lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return list(cached)
        ids = list(self.tokenizer.encode(text, add_special_tokens=True))
        if len(text) <= _CACHE_MAX_CHARS:
            with self._cache_lock:
                self._cache[text] = tuple(ids)
                if len(self._cache) > _CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return ids

    def _untrusted_is_plain(self, chunk: list[_Text], text: str) -> bool:
        """True when no special-token or placeholder string lies in or across an untrusted span, so the
        chunk string tokenizes exactly as upstream with no typed text turning special."""
        start = 0
        for segment in chunk:
            end = start + len(segment.text)
            if not segment.trusted:
                lo, hi = max(0, start - self._longest + 1), min(len(text), end + self._longest - 1)
                for token in self._dangerous:
                    at = text.find(token, lo, hi)
                    while at != -1:
                        if at < end and at + len(token) > start:
                            return False
                        at = text.find(token, at + 1, hi)
                if not segment.text.isascii():  # compatibility forms of "<", "|", ... (normalizers)
                    folded = unicodedata.normalize("NFKC", segment.text)
                    if folded != segment.text and any(token in folded for token in self._dangerous):
                        return False
            start = end
        return True

    def _plain_untrusted_ids(self, chunk: list[_Text]) -> list[int]:
        """The chunk as `tokenizer(chunk)` would give it if the untrusted spans had no special tokens:
        template special tokens keep their ids, all text between them is tokenized without added-token
        matching (the tokenizer splits at added tokens and tokenizes the pieces between them alone too)."""
        ids = list(self._prefix)
        pending = ""
        for segment in chunk:
            if not segment.trusted or self._added_re is None:
                pending += segment.text
                continue
            at = 0
            for match in self._added_re.finditer(segment.text):
                pending += segment.text[at : match.start()]
                ids += self._plain_ids(pending)
                ids.append(self._added[match.group()])
                pending, at = "", match.end()
            pending += segment.text[at:]
        ids += self._plain_ids(pending)
        return ids + self._suffix

    def _plain_ids(self, text: str) -> list[int]:
        """`text` through the tokenizer's normalizer, pre-tokenizer and model: no added token can match."""
        if not text:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer: its own switch (it covers special tokens only)
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        if backend.pre_tokenizer is not None:
            words = [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        else:
            words = [normalized]
        return [token.id for word in words for token in backend.model.tokenize(word)]
