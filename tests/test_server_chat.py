"""POST /v1/chat/completions through the real `openai` client against a real `vita-duplex serve`.

The served tiny VITA-1.5 checkpoint always starts its reply with ☞ (query); the rest is gibberish, so the
tests check shape, state handling, media plumbing, speech, errors and cleanup, never wording.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.vllm

DATA = Path(__file__).parent / "data"
STATE_TOKENS = ("☞", "☟", "☜")
# Greedy decoding of this prompt on the served tiny model runs to max_tokens (no early EOS).
LONG_PROMPT = "Count to one thousand."


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def media_parts() -> list[Any]:
    png = base64.b64encode((DATA / "house.png").read_bytes()).decode()
    wav = base64.b64encode((DATA / "beckett.wav").read_bytes()).decode()
    return [
        {"type": "text", "text": "What is in the picture, and what did I say?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
    ]


def as_messages(*messages: dict[str, Any]) -> list[Any]:
    """Messages with video_url parts, which the SDK's types do not know (vLLM's extension)."""
    return list(messages)


def metric(server_url: str, name: str) -> float:
    text = httpx.get(server_url + "/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is missing from /metrics"
    return float(match.group(1))


def in_flight(server_url: str) -> float:
    return metric(server_url, "vita_engine_requests_in_flight")


def wait_idle(server_url: str, within_s: float = 1.0) -> float:
    deadline = time.monotonic() + within_s
    while (value := in_flight(server_url)) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def assert_clean_reply(completion, served: str) -> str:
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion" and completion.model == served
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    content = choice.message.content
    assert isinstance(content, str) and content
    assert not any(token in content for token in STATE_TOKENS)
    assert (completion.model_extra or {})["vita"]["state"] == "query"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    return content


def test_text_only_tts_gives_a_warning_not_audio() -> None:
    from types import SimpleNamespace

    from duplex.tts import TextOnlyTTS
    from server.chat import ChatRequest, _speech

    req = ChatRequest.model_validate({"model": "v", "messages": HI, "modalities": ["text", "audio"]})
    speech, warning = _speech(SimpleNamespace(tts_factory=TextOnlyTTS), req)  # type: ignore[arg-type]
    assert speech is None and warning is not None and "no audio" in warning


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["query"]


def test_text_only(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "Hello, who are you?"}], max_tokens=32
    )
    assert_clean_reply(completion, "query")


def test_image_and_audio(client: openai.OpenAI, media_parts: list[dict]) -> None:
    completion = client.chat.completions.create(
        model="vita",
        messages=as_messages(
            {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": media_parts}
        ),
        max_completion_tokens=16,
        temperature=0,
    )
    assert_clean_reply(completion, "query")
    # The placeholders for one image (tiles) and one clip are in the prompt, the media around them.
    assert completion.usage is not None and completion.usage.prompt_tokens > 150


def test_ended_requests_are_freed_with_their_media(client: openai.OpenAI, media_parts: list[dict],
                                                  server_url: str) -> None:
    """sse-starlette leaves each streamed response in a reference cycle (a cancelled task's traceback holds the
    frame whose callback holds the response) that only the interpreter's rare full collection frees. The
    generation, with its prompt's image and audio, must not be in it: the server counts its ended requests
    still in memory, and this test cannot make it collect."""
    messages = as_messages({"role": "user", "content": media_parts})
    for stream in (True, False, True):
        reply = client.chat.completions.create(model="vita", messages=messages, max_tokens=4, stream=stream)
        if stream:
            assert list(reply)  # type: ignore[call-overload]
    for _ in range(100):
        if (ended := metric(server_url, "vita_chat_requests_ended_in_memory")) == 0:
            break
        time.sleep(0.1)
    assert ended == 0, "an ended chat request is still in memory"


def test_image_and_audio_streaming(client: openai.OpenAI, media_parts: list[dict]) -> None:
    stream = client.chat.completions.create(
        model="vita",
        messages=as_messages({"role": "user", "content": media_parts}),
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    first, last_choice, usage_chunk = chunks[0], chunks[-2], chunks[-1]
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    assert (first.model_extra or {})["vita"]["state"] == "query"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and not any(token in text for token in STATE_TOKENS)
    assert last_choice.choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert 0 < usage_chunk.usage.completion_tokens <= 16


def test_video_url(client: openai.OpenAI, tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 4.0, (64, 64))
    for i in range(8):
        writer.write(np.full((64, 64, 3), i * 30, np.uint8))
    writer.release()
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    video = {"type": "video_url", "video_url": {"url": url}}
    completion = client.chat.completions.create(
        model="vita",
        messages=as_messages({"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}),
        max_tokens=8,
    )
    assert_clean_reply(completion, "query")


def test_history_with_audio_and_earlier_image(client: openai.OpenAI, media_parts: list[dict]) -> None:
    completion = client.chat.completions.create(
        model="vita",
        messages=as_messages(
            {"role": "developer", "content": "Be kind."},
            {"role": "user", "content": media_parts},  # its image is dropped, its audio kept
            {"role": "assistant", "content": "A house."},
            {"role": "user", "content": "And the roof?"},
        ),
        max_tokens=8,
    )
    assert_clean_reply(completion, "query")


def test_spoken_reply_is_a_wav(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="vita",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=16,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
    )
    content = assert_clean_reply(completion, "query")
    audio = completion.choices[0].message.audio
    assert audio is not None and audio.id and audio.expires_at > time.time()
    assert audio.transcript == content
    with wave.open(io.BytesIO(base64.b64decode(audio.data))) as clip:
        assert clip.getnchannels() == 1 and clip.getframerate() == 24000 and clip.getsampwidth() == 2
        assert clip.getnframes() / clip.getframerate() > 0.1


def test_spoken_reply_streams_pcm16(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="vita",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=16,
        stream=True,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
    )
    chunks = list(stream)
    parts = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert len({a.id for a in parts}) == 1
    pcm = b"".join(base64.b64decode(a.data) for a in parts if a.data)
    assert len(pcm) % 2 == 0 and len(pcm) / 2 / 24000 > 0.1  # PCM16 at 24 kHz
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(a.transcript or "" for a in parts) == content != ""
    assert parts[-1].expires_at is not None


# --- errors ------------------------------------------------------------------------------------------------


def test_missing_key_is_401(server_url: str) -> None:
    response = httpx.post(
        server_url + "/v1/chat/completions", json={"model": "x", "messages": []}, timeout=10
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_wrong_key_is_401(server_url: str) -> None:
    wrong = openai.OpenAI(base_url=server_url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def image(url: str) -> list[Any]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("messages", "extra", "code", "says"),
    [
        (image("data:image/png;base64,%%%not base64%%%"), {}, "invalid_media", "base64"),
        (image("https://example.com/house.png"), {}, "media_url_refused", "remote media URLs are disabled"),
        (image("/etc/passwd"), {}, "media_url_refused", "local files"),
        (image("file:///etc/passwd"), {}, "media_url_refused", "local files"),
        (HI + [{"role": "assistant", "content": "hello"}], {}, "invalid_value", "last message must be from the user"),
        (HI, {"n": 2}, "invalid_value", "n must be 1"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAE=", "format": "aac"}}]}],
         {}, "invalid_media", "mp3, flac or ogg"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}], {}, "invalid_request",
         "expected tags"),
        ([{"role": "tool", "content": "x"}], {}, "invalid_request", "messages[0].role"),
        (HI, {"modalities": ["audio"]}, "invalid_value", "modalities"),
    ],
)  # fmt: skip
def test_bad_requests_are_400(
    client: openai.OpenAI, messages: list, extra: dict, code: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="vita", messages=messages, max_tokens=4, **extra)
    assert info.value.status_code == 400
    error = cast(dict, info.value.body)
    assert error["type"] == "invalid_request_error" and error["code"] == code
    assert says in error["message"]


def test_malformed_json_is_400_not_422(server_url: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for body in (b"{nope", b"[1, 2]", b'{"messages": [{"role": "user", "content": "hi"}]}'):
        response = httpx.post(server_url + "/v1/chat/completions", content=body, headers=headers, timeout=10)
        assert response.status_code == 400, body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# --- cleanup and admission ------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_stream(http: httpx.Client, server_url: str) -> Iterator[Iterator[str]]:
    body = {
        "model": "vita",
        "stream": True,
        "max_tokens": 2000,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with http.stream("POST", server_url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        assert next(lines).startswith("data: ")
        yield lines


def test_stream_disconnect_aborts_the_engine_request(server_url: str) -> None:
    assert wait_idle(server_url) == 0
    with httpx.Client(timeout=30) as http, open_stream(http, server_url) as lines:
        next(lines)
        assert in_flight(server_url) >= 1  # still generating when the client leaves
    assert wait_idle(server_url, within_s=1.0) == 0


def test_non_stream_disconnect_aborts_the_engine_request(server_url: str) -> None:
    body = {"model": "vita", "max_tokens": 2000, "messages": [{"role": "user", "content": LONG_PROMPT}]}
    before = metric(server_url, "vita_chat_requests_aborted_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server_url + "/v1/chat/completions",
            json=body,
            # Gone mid-answer: the server caps max_tokens at its own (48 here), 0.1-0.2 s of the tiny model on a
            # quiet host (at 0.1 s the answer sometimes came first).
            timeout=0.03,
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert wait_idle(server_url, within_s=1.5) == 0
    # Aborted, not run to its end: the idle server alone cannot tell (48 tokens end within the wait anyway).
    assert metric(server_url, "vita_chat_requests_aborted_total") == before + 1


def test_at_capacity_is_503_and_slots_come_back(server_url: str, client: openai.OpenAI) -> None:
    with httpx.Client(timeout=30) as http, contextlib.ExitStack() as streams:
        for _ in range(4):  # the fixture's --max-sessions
            streams.enter_context(open_stream(http, server_url))
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="vita", messages=HI, max_tokens=4)
        assert info.value.status_code == 503 and cast(dict, info.value.body)["code"] == "server_at_capacity"
    assert wait_idle(server_url) == 0
    assert client.chat.completions.create(model="vita", messages=HI, max_tokens=4).choices[0].message.content
