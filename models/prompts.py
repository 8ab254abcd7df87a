"""VITA chat templates as token ids, with one placeholder id per image/audio item.

We tokenize the text between placeholders chunk by chunk (as VITA's `tokenizer_image_audio_token`
does) and insert the placeholder ids from the config ourselves, so no user text can ever turn into
a placeholder. User text is tokenized with special-token parsing off: typing "<|im_end|>" or "<2>"
cannot forge a turn boundary or a state token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .config import STATE_TOKEN_TEXT, VitaConfig

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


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ..., **kwargs: object) -> list[int]: ...
    def convert_tokens_to_ids(self, tokens: str) -> int: ...


@dataclass(frozen=True)
class Turn:
    """One chat turn. Media are counted here; the items themselves travel beside the prompt."""

    role: Literal["user", "assistant"]
    text: str = ""
    images: int = 0
    audios: int = 0


@dataclass(frozen=True)
class _Special:
    token: str


@dataclass(frozen=True)
class _Placeholder:
    modality: Literal["image", "audio"]


_Piece = str | _Special | _Placeholder


@dataclass
class PromptBuilder:
    """Builds prompt token ids for one checkpoint (its layout, tokenizer and placeholder ids)."""

    tokenizer: Tokenizer
    config: VitaConfig
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def system_prompt(self, modality: Modality) -> str:
        return SYSTEM_PROMPTS["language" if modality in ("text", "audio") else modality]

    def build(self, turns: Sequence[Turn], *, modality: Modality, system: str | None = None) -> list[int]:
        """Prompt ids for `turns` (the last one the user's), ending where the assistant speaks."""
        if not turns or turns[-1].role != "user":
            raise ValueError("a prompt must end with a user turn")
        pieces = self._pieces(turns, system if system is not None else self.system_prompt(modality))
        ids: list[int] = []
        for piece in pieces:
            ids.extend(self._ids(piece))
        return ids

    # -- templates -----------------------------------------------------------------------------

    def _pieces(self, turns: Sequence[Turn], system: str) -> list[_Piece]:
        if self.config.layout == "vita10":
            return self._mixtral_two(turns, system)
        return self._qwen2p5_instruct(turns, system)

    def _qwen2p5_instruct(self, turns: Sequence[Turn], system: str) -> list[_Piece]:
        start, end = _Special("<|im_start|>"), _Special("<|im_end|>")
        out: list[_Piece] = [start, "system\n" + system, end, "\n"]
        for turn in turns:
            out += [start, ("user" if turn.role == "user" else "assistant") + "\n"]
            out += self._content(turn)
            out += [end, "\n"]
        out += [start, "assistant\n"]
        return out

    def _mixtral_two(self, turns: Sequence[Turn], system: str) -> list[_Piece]:
        eos = _Special("</s>")
        out: list[_Piece] = [_Special("<s>"), "system:" + system, eos, "\n"]
        for turn in turns:
            out.append("user:" if turn.role == "user" else "bot:")
            out += self._content(turn)
            out += [eos, "\n"]
        out.append("bot:")
        return out

    def _content(self, turn: Turn) -> list[_Piece]:
        if turn.role == "assistant":
            return self._assistant_text(turn.text)
        # VITA's training order: images (video frames) first, then a newline, then audio / text.
        out: list[_Piece] = [_Placeholder("image")] * turn.images
        if turn.images:
            out.append("\n")
        out += [_Placeholder("audio")] * turn.audios
        if turn.text:
            out.append(turn.text)
        return out

    def _assistant_text(self, text: str) -> list[_Piece]:
        """History replies keep their state token (as VITA was trained), as that token's own id."""
        for token in STATE_TOKEN_TEXT[self.config.layout].values():
            if text.startswith(token):
                rest = text[len(token) :]
                return [_Special(token), rest] if rest else [_Special(token)]
        return [text]

    # -- tokenization --------------------------------------------------------------------------

    def _ids(self, piece: _Piece) -> list[int]:
        if isinstance(piece, _Placeholder):
            attr = "image_token_index" if piece.modality == "image" else "audio_token_index"
            return [getattr(self.config, attr)]
        if isinstance(piece, _Special):
            return [self.special_id(piece.token)]
        if not piece:
            return []
        cached = self._cache.get(piece)
        if cached is None:
            cached = list(self.tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True))
            if len(piece) < 512:  # template fragments and system prompts repeat every turn
                self._cache[piece] = cached
        return cached

    def special_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer must encode {token!r} as one token; got {ids}")
        return ids[0]
