"""Conversation items in their GA shapes, built strictly (server_events.strict).

GA names the content parts of an assistant message `output_text` / `output_audio`, and those of a user
message `input_text` / `input_audio` / `input_image`; the `response.content_part.*` events keep the
older part names `text` / `audio` (so say the SDK's models). These builders are the only place that
spells them, so a client never sees a part type from the wrong table.
"""

from __future__ import annotations

from typing import Literal

from openai.types.realtime import (
    RealtimeConversationItemAssistantMessage,
    RealtimeConversationItemSystemMessage,
    RealtimeConversationItemUserMessage,
)

from .server_events import strict

ItemStatus = Literal["completed", "incomplete", "in_progress"]
UserPart = dict[str, str | None]  # {"type": "input_text", "text": ...}, {"type": "input_audio", ...}, ...


def assistant_message(
    item_id: str, *, audio: bool, text: str | None, status: ItemStatus
) -> RealtimeConversationItemAssistantMessage:
    """An answer: spoken (`output_audio` with its transcript) or written (`output_text`). `text=None`
    while it has no content part yet (between response.output_item.added and its content part)."""
    content: list[dict[str, str]] = []
    if text is not None:
        content = [{"type": "output_audio", "transcript": text} if audio else {"type": "output_text", "text": text}]
    return strict(RealtimeConversationItemAssistantMessage, id=item_id, object="realtime.item", type="message",
                  role="assistant", status=status, content=content)


def response_part(*, audio: bool, text: str) -> dict[str, str]:
    """The `part` of response.content_part.added/done."""
    return {"type": "audio", "transcript": text} if audio else {"type": "text", "text": text}


def user_message(item_id: str, parts: list[UserPart]) -> RealtimeConversationItemUserMessage:
    return strict(RealtimeConversationItemUserMessage, id=item_id, object="realtime.item", type="message",
                  role="user", status="completed", content=parts)


def system_message(item_id: str, texts: list[str]) -> RealtimeConversationItemSystemMessage:
    return strict(RealtimeConversationItemSystemMessage, id=item_id, object="realtime.item", type="message",
                  role="system", status="completed",
                  content=[{"type": "input_text", "text": text} for text in texts])
