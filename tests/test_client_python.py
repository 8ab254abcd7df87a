"""clients/python against a real server process: the RealtimeClient, and `vita-duplex talk` / `ask` run as
subprocesses the way a user runs them."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from clients.python import RealtimeClient, ServerEvent, realtime_url
from clients.python.cli import EventPrinter, Progress
from server.process import free_port
from tests.conftest import API_KEY, DATA
from tests.speech import compose

pytestmark = pytest.mark.vllm

QUESTION = "What is the weather like today?"


def _question_16k(text: str = QUESTION) -> np.ndarray:
    audio, _ = compose([("silence", 0.3), ("speech", text), ("silence", 1.0)])
    return audio


async def _collect(rt: RealtimeClient, until: str, timeout: float = 60.0) -> list[ServerEvent]:
    events: list[ServerEvent] = []
    async with asyncio.timeout(timeout):
        async for event in rt.events():
            events.append(event)
            if event.type == until:
                return events
    raise AssertionError(f"the session closed before {until}: {[e.type for e in events]}")


def _jpeg(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def _first(events: list[ServerEvent], kind: str) -> int:
    return next(i for i, e in enumerate(events) if e.type == kind)


async def test_realtime_client_round_trip(server_url: str) -> None:
    async with RealtimeClient.connect(server_url, api_key=API_KEY) as rt:
        assert rt.session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        await rt.update_session(output_modalities=["audio"])
        audio = _question_16k()
        for start in range(0, len(audio), 800):  # 50 ms at 16 kHz, resampled to the session's 24 kHz
            await rt.append_audio_float(audio[start : start + 800], 16000)
        events = await _collect(rt, "response.done")

        types = [e.type for e in events]
        assert types[:2] == ["session.created", "session.updated"]
        order = [_first(events, kind) for kind in (
            "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "vita.segment.classified",
            "response.created", "response.output_audio.delta", "response.done")]
        assert order == sorted(order), types
        classified = events[_first(events, "vita.segment.classified")]
        assert (classified["kind"], classified["ignored"]) == ("query", False)
        reply = b"".join(e.audio for e in events)
        assert len(reply) > 2 * 2400  # more than 0.1 s of 24 kHz PCM16
        transcript = "".join(e["delta"] for e in events if e.type == "response.output_audio_transcript.delta")
        assert transcript and "☞" not in transcript
        assert events[-1].response_id == events[_first(events, "response.created")].response_id

        item_id = events[_first(events, "response.output_item.added")]["item"]["id"]
        await rt.truncate(item_id, 100)
        truncated = (await _collect(rt, "conversation.item.truncated"))[-1]
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 100)


async def test_error_events_do_not_end_the_stream_and_text_turns_cancel(server_url: str) -> None:
    async with RealtimeClient.connect(server_url, api_key=API_KEY) as rt:
        await rt.send_frame(b"not an image")
        error = (await _collect(rt, "error"))[-1].error
        assert error is not None and error.code == "invalid_image" and error.message
        await rt.send_frame(_jpeg(DATA / "house.png"))  # a real frame is accepted silently (JPEG: base64 "/9j/…")
        await rt.send_text("Hello?", modalities=["text"])
        events = await _collect(rt, "response.created")
        assert not [e for e in events if e.type == "error"]
        await rt.cancel()
        done = (await _collect(rt, "response.done"))[-1]
        assert done["response"]["status"] == "cancelled"


async def test_manual_turn_commit_and_create_response(server_url: str) -> None:
    async with RealtimeClient.connect(server_url, api_key=API_KEY) as rt:
        await rt.update_session(turn_detection=None, output_modalities=["text"])
        await rt.append_audio_float(_question_16k("Hello there."), 16000)
        await rt.commit()
        await rt.create_response()
        events = await _collect(rt, "response.done")
        types = [e.type for e in events]
        assert "input_audio_buffer.speech_started" not in types  # no VAD: the commit made the turn
        assert _first(events, "input_audio_buffer.committed") < _first(events, "response.created")
        assert "".join(e["delta"] for e in events if e.type == "response.output_text.delta")


def test_realtime_url() -> None:
    assert realtime_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/realtime?model=vita"
    assert realtime_url("https://vita.example/api/", model="m") == "wss://vita.example/api/v1/realtime?model=m"
    assert realtime_url("https://vita.example/v1") == "wss://vita.example/v1/realtime?model=vita"
    with pytest.raises(ValueError, match="http://host:port"):
        realtime_url("127.0.0.1:8000")


def test_printer_keeps_a_delta_stream_on_one_line() -> None:
    out = io.StringIO()
    printer = EventPrinter(out)
    for data in (
        {"type": "input_audio_buffer.speech_started", "audio_start_ms": 300},
        {"type": "response.output_audio_transcript.delta", "delta": "Hel"},
        {"type": "response.output_audio.delta", "delta": ""},
        {"type": "response.output_audio_transcript.delta", "delta": "lo"},
        {"type": "response.done", "response": {"status": "completed"}},
    ):
        printer.show(ServerEvent(data["type"], data))
    assert out.getvalue() == "[speech started] at 0.30 s\n[transcript] Hello\n[response done] completed\n"


def test_progress_gives_up_when_every_segment_was_noise() -> None:
    progress = Progress()
    for data in (
        {"type": "input_audio_buffer.speech_started"},
        {"type": "input_audio_buffer.speech_stopped"},
        {"type": "vita.segment.classified", "kind": "noise", "ignored": True},
    ):
        progress.feed(ServerEvent(data["type"], data))
    assert progress.unanswerable() is None  # the file is still being sent
    progress.sent_all = True
    assert "background noise" in (progress.unanswerable() or "")
    progress.feed(ServerEvent("response.created", {"type": "response.created", "response": {"id": "r1"}}))
    assert progress.unanswerable() is None


# --- the CLI as a user runs it ------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("VITA_URL", "VITA_API_KEY")}
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2

    path = tmp_path_factory.mktemp("talk") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(50):  # 5 s: five frames at 1 fps
        writer.write(np.full((48, 64, 3), i * 5, np.uint8))
    writer.release()
    return path


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("talk") / "question.wav"
    sf.write(path, _question_16k(), 16000, subtype="PCM_16")
    return path


def test_talk_streams_a_file_and_saves_the_spoken_reply(
    server_url: str, question_wav: Path, clip_mp4: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reply.wav"
    run = _cli("talk", "--file", str(question_wav), "--image", str(DATA / "house.png"), "--video", str(clip_mp4),
               "--fast", "--out", str(out), "--url", server_url, "--api-key", API_KEY)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert not [line for line in lines if line.startswith("[server error]")], run.stdout
    for prefix in ("[speech started]", "[speech stopped]", "[segment classified] query: answering",
                   "[response started]", "[transcript] ", "[response done]", "[saved]"):
        assert any(line.startswith(prefix) for line in lines), f"{prefix!r} missing:\n{run.stdout}"
    transcript = next(line for line in lines if line.startswith("[transcript] "))
    assert len(transcript) > len("[transcript] ") and "☞" not in transcript
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.duration > 0.1


def test_ask_answers_a_question_about_an_image(server_url: str) -> None:
    run = _cli("ask", "What is in this picture?", "--image", str(DATA / "house.png"),
               env={"VITA_URL": server_url, "VITA_API_KEY": API_KEY})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "☞" not in run.stdout


def test_ask_streams_an_answer_to_speech(server_url: str) -> None:
    run = _cli("ask", "Answer the question.", "--audio", str(DATA / "beckett.wav"), "--stream",
               "--url", server_url, "--api-key", API_KEY)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_talk_without_a_server_says_so(question_wav: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = _cli("talk", "--file", str(question_wav), "--url", url, timeout=60)
    assert run.returncode != 0
    assert f"could not connect to {url}: is the server running?" in run.stderr


@pytest.mark.parametrize("command", ["talk", "ask"])
def test_wrong_key_is_reported_as_an_authentication_failure(server_url: str, question_wav: Path,
                                                            command: str) -> None:
    args = ["--file", str(question_wav)] if command == "talk" else ["Hello?"]
    run = _cli(command, *args, "--url", server_url, "--api-key", "wrong-key", timeout=60)
    assert run.returncode != 0
    assert "authentication failed: check --api-key / VITA_API_KEY" in run.stderr


def test_mic_without_the_extra_says_how_to_install_it() -> None:
    if importlib.util.find_spec("sounddevice") is not None:
        pytest.skip("sounddevice is installed")
    run = _cli("talk", "--mic", timeout=60)
    assert run.returncode == 2
    assert "microphone input needs the optional extra: pip install 'vita-duplex[mic]'" in run.stderr
