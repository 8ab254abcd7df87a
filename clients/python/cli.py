"""`vita-duplex talk` (a spoken turn over the realtime WebSocket) and `vita-duplex ask` (one chat completion).

`clients/cli.py` calls `add_subcommands(subparsers)`; each subcommand stores its runner as `client_command`.
Heavy imports happen inside the runners so the other `vita-duplex` commands do not pay for them.

Exit status: 0 answered, 1 connection / authentication / server / timeout failures, 2 bad arguments or inputs,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

if TYPE_CHECKING:
    import numpy as np

    from .realtime import RealtimeClient, ServerEvent

DEFAULT_URL = "http://127.0.0.1:8000"
OUTPUT_RATE = 24000  # the reply is requested as 24 kHz PCM16 and saved as such
MIC_EXTRA = "microphone input needs the optional extra: pip install 'vita-duplex[mic]'"
AUTH_HINT = "authentication failed: check --api-key / VITA_API_KEY"
NO_SPEECH_GRACE_S = 10.0  # after the last sample: time for the server's VAD (maybe busy) to report speech


class InputError(Exception):
    """A file given on the command line cannot be used (exit status 2)."""


class TalkFailed(Exception):
    """The session ran but ended without an answer (exit status 1)."""


# --- argument parsing ---------------------------------------------------------------------------------


# Decodes a video file into frames (PIL images). The client imports only the wire layer, so the command line
# above it (`clients/cli.py`) plugs in the model layer's decoder, which samples frames as VITA does.
VideoFrames = Callable[[bytes], list[Any]]
_video_frames: VideoFrames | None = None


def add_subcommands(subparsers: Any, video_frames: VideoFrames | None = None) -> None:
    """Add `talk` and `ask` to the `vita-duplex` parser (an argparse subparsers action). `video_frames` turns a
    video file into frames for `talk --video`; without it `--video` is refused."""
    global _video_frames  # one command-line process, set once before parsing
    _video_frames = video_frames
    talk = subparsers.add_parser("talk", help="speak to a running server over the realtime WebSocket")
    source = talk.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="a speech file (WAV/FLAC/OGG, any rate), streamed in real time")
    source.add_argument("--mic", action="store_true", help="speak into the microphone (extra: vita-duplex[mic])")
    talk.add_argument("--image", type=Path, action="append", default=[], help="sent as a camera frame; repeatable")
    talk.add_argument("--video", type=Path, help="sampled at 1 fps; the frames are sent before the speech")
    _connection_args(talk)
    talk.add_argument("--fast", action="store_true", help="send the file as fast as possible, not in real time")
    talk.add_argument("--out", type=Path, default=Path("reply.wav"), help="the spoken reply, 24 kHz mono WAV")
    talk.add_argument("--text-only", action="store_true", help="ask for a text reply; no WAV is written")
    talk.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    talk.add_argument("--chunk-ms", type=int, default=40, help="audio per event, 20-100 ms (default 40)")
    talk.set_defaults(client_command=run_talk)

    ask = subparsers.add_parser("ask", help="one chat completion (text, image, audio) from a running server")
    ask.add_argument("text")
    ask.add_argument("--image", type=Path, action="append", default=[], help="repeatable")
    ask.add_argument("--audio", type=Path, help="a speech file (WAV/FLAC/OGG/MP3)")
    _connection_args(ask)
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--timeout", type=float, default=120.0)
    ask.set_defaults(client_command=run_ask)


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"server base URL (default: $VITA_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", help="API key (default: $VITA_API_KEY)")
    parser.add_argument("--model", default="vita", help="model name sent to the server (default: vita)")


def _url(args: argparse.Namespace) -> str:
    return (args.url or os.environ.get("VITA_URL") or DEFAULT_URL).rstrip("/")


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("VITA_API_KEY") or None


def _fail(message: str, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


# --- inputs -------------------------------------------------------------------------------------------


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A sound file as float32 mono samples and its rate."""
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:  # soundfile raises LibsndfileError, a RuntimeError
        raise InputError(f"cannot read audio {path}: {exc} (accepted: WAV, FLAC, OGG, MP3)") from None
    if not len(audio):
        raise InputError(f"audio {path} is empty")
    return audio.mean(axis=1), int(rate)


def image_bytes(path: Path) -> tuple[bytes, str]:
    """An image file as (JPEG or PNG bytes, MIME type); other formats are re-encoded as JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format in ("JPEG", "PNG"):
                return data, f"image/{img.format.lower()}"
            return _jpeg(img), "image/jpeg"
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read image {path}: {exc} (accepted: JPEG, PNG, WebP, GIF, BMP)") from None


def video_jpegs(path: Path) -> list[bytes]:
    """Frames of a video at 1 fps (VITA's policy: 4 to 16 frames), JPEG-encoded."""
    if _video_frames is None:
        raise InputError("--video needs the model layer's video decoder (run it as `vita-duplex talk`)")
    try:
        return [_jpeg(frame) for frame in _video_frames(path.read_bytes())]
    except (OSError, ValueError) as exc:  # the decoder's InvalidMediaError is a ValueError
        raise InputError(f"cannot read video {path}: {exc}") from None


def _jpeg(img: Any) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


# --- talk ---------------------------------------------------------------------------------------------


AudioChunks = AsyncIterator["tuple[np.ndarray, int]"]


def run_talk(args: argparse.Namespace) -> int:
    """`vita-duplex talk`: returns the exit status."""
    if not 20 <= args.chunk_ms <= 100:
        return _fail(f"--chunk-ms must be between 20 and 100; got {args.chunk_ms}", 2)
    if args.mic:
        try:
            import sounddevice  # noqa: F401
        except ImportError:
            return _fail(MIC_EXTRA, 2)
    try:
        frames = [image_bytes(p)[0] for p in args.image]
        if args.video:
            frames += video_jpegs(args.video)
        audio = read_audio(args.file) if args.file else None
    except InputError as exc:
        return _fail(str(exc), 2)
    try:
        return asyncio.run(_talk(args, frames, audio))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


async def _talk(args: argparse.Namespace, frames: list[bytes], audio: tuple[np.ndarray, int] | None) -> int:
    from .realtime import (
        AuthenticationFailed,
        ConnectFailed,
        RealtimeClient,
        RealtimeError,
        ServerUnavailable,
    )

    url = _url(args)
    try:
        async with RealtimeClient.connect(url, api_key=_api_key(args), model=args.model) as rt:
            return await _converse(rt, args, frames, audio)
    except ValueError as exc:  # a malformed --url
        return _fail(str(exc), 2)
    except ConnectFailed as exc:
        return _fail(f"could not connect to {url}: is the server running? ({exc})")
    except AuthenticationFailed as exc:
        return _fail(f"{AUTH_HINT} (server: {exc})")
    except ServerUnavailable as exc:
        return _fail(f"the server cannot take a session now: {exc}; retry shortly")
    except RealtimeError as exc:
        return _fail(str(exc))


async def _converse(
    rt: RealtimeClient, args: argparse.Namespace, frames: list[bytes], audio: tuple[np.ndarray, int] | None
) -> int:
    pcm24k = {"type": "audio/pcm", "rate": OUTPUT_RATE}
    await rt.update_session(output_modalities=["text" if args.text_only else "audio"],
                            audio={"input": {"format": pcm24k}, "output": {"format": pcm24k}})
    for frame in frames:  # before the speech, so the question sees them
        await rt.send_frame(frame)
    progress = Progress()
    printer = EventPrinter(sys.stdout)
    chunks = _file_chunks(*audio, args.chunk_ms, _tail_silence_s(rt)) if audio else _mic_chunks(args.chunk_ms)
    sender = _send(rt, chunks, progress, pace=not args.fast, from_file=audio is not None)
    try:
        await asyncio.wait_for(_until_answered(_consume(rt, printer, progress), sender), args.timeout)
    except TimeoutError:
        printer.end()
        return _fail(f"no answer within {args.timeout:g} s (--timeout)")
    except TalkFailed as exc:
        printer.end()
        return _fail(str(exc))
    printer.end()
    if progress.done is None:
        return _fail("the server ended the session before answering")
    return _save_reply(progress, args)


async def _until_answered(consume: Awaitable[None], send: Awaitable[None]) -> None:
    """Run the reader and the sender together until the reader is done (the sender may finish first)."""
    consumer, sender = asyncio.ensure_future(consume), asyncio.ensure_future(send)
    try:
        done, _ = await asyncio.wait({consumer, sender}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            sender.result()  # raises TalkFailed when the file gave nothing to answer
        await consumer
    finally:
        for task in (consumer, sender):
            task.cancel()
        await asyncio.gather(consumer, sender, return_exceptions=True)


def _tail_silence_s(rt: RealtimeClient) -> float:
    """Silence appended after the file: the VAD ends a turn only after silence_duration_ms of quiet."""
    detection = ((rt.session.get("audio") or {}).get("input") or {}).get("turn_detection") or {}
    return float(detection.get("silence_duration_ms") or 500) / 1000 + 0.5


async def _file_chunks(samples: np.ndarray, rate: int, chunk_ms: int, tail_s: float) -> AudioChunks:
    import numpy as np

    step = max(1, rate * chunk_ms // 1000)
    padded = np.concatenate([samples, np.zeros(int(tail_s * rate), np.float32)])
    for start in range(0, len(padded), step):
        yield padded[start : start + step], rate


async def _mic_chunks(chunk_ms: int) -> AudioChunks:
    import sounddevice as sd

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[np.ndarray] = asyncio.Queue()
    rate = int(sd.query_devices(kind="input")["default_samplerate"])  # the client resamples to the session's

    def on_audio(block: np.ndarray, *_: object) -> None:  # runs on PortAudio's thread
        loop.call_soon_threadsafe(queue.put_nowait, block[:, 0].copy())

    with sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=rate * chunk_ms // 1000,
                        callback=on_audio):
        print("[mic] listening; speak now (Ctrl-C to stop)", flush=True)
        while True:
            yield await queue.get(), rate


async def _send(rt: RealtimeClient, chunks: AudioChunks, progress: Progress, pace: bool, from_file: bool) -> None:
    """Stream the audio (paced to real time unless --fast), then make sure the file's turn ends."""
    loop = asyncio.get_running_loop()
    start, sent_s = loop.time(), 0.0
    async for samples, rate in chunks:
        await rt.append_audio_float(samples, rate)
        sent_s += len(samples) / rate
        delay = start + sent_s - loop.time() if pace else 0.0
        await asyncio.sleep(max(0.0, delay))  # sleep(0) still lets the reader run under --fast
    if from_file:
        await _finish_file_turn(rt, progress)


async def _finish_file_turn(rt: RealtimeClient, progress: Progress) -> None:
    """The file and its trailing silence are sent: fail if nothing was heard, else let the turn end.

    Under --fast the server's VAD may still be working through the audio, so wait for its verdicts first;
    commit only if the speech is still open after that (it should not be: the tail is silence)."""
    progress.sent_all = True
    if not await progress.wait_until(lambda: progress.started > 0, NO_SPEECH_GRACE_S):
        raise TalkFailed("no speech detected in the audio (the server's VAD heard nothing): "
                         "is the file silent or very quiet?")
    if not await progress.wait_until(lambda: not progress.speech_open, NO_SPEECH_GRACE_S):
        await rt.commit()  # with server VAD, commit ends the speech in progress
    # give the verdicts time to arrive; give up only if no answer came and every segment was ignored
    answered = await progress.wait_until(lambda: progress.response_id is not None, NO_SPEECH_GRACE_S)
    if not answered and (reason := progress.unanswerable()) is not None:
        raise TalkFailed(reason)


async def _consume(rt: RealtimeClient, printer: EventPrinter, progress: Progress) -> None:
    """Print events until the first response is done."""
    async for event in rt.events():
        printer.show(event)
        progress.feed(event)
        if progress.done is not None:
            return


@dataclass
class Progress:
    """What the session has said so far: speech segments, the first response, its audio."""

    started: int = 0
    stopped: int = 0
    resolved: int = 0  # segments classified or discarded
    ignored: int = 0
    sent_all: bool = False
    response_id: str | None = None
    audio: bytearray = field(default_factory=bytearray)
    done: dict[str, Any] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def speech_open(self) -> bool:
        return self.started > self.stopped

    def feed(self, event: ServerEvent) -> None:
        handlers: dict[str, Callable[[ServerEvent], None]] = {
            "input_audio_buffer.speech_started": self._speech_started,
            "input_audio_buffer.speech_stopped": self._speech_stopped,
            "vita.segment.classified": self._classified,
            "vita.segment.discarded": self._discarded,
            "response.created": self._response_created,
            "response.output_audio.delta": self._audio,
            "response.done": self._response_done,
        }
        if handler := handlers.get(event.type):
            handler(event)
            self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait for events until `condition()` holds; False if it still does not after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return condition()
        return True

    def _speech_started(self, event: ServerEvent) -> None:
        self.started += 1

    def _speech_stopped(self, event: ServerEvent) -> None:
        self.stopped += 1

    def _classified(self, event: ServerEvent) -> None:
        self.resolved += 1
        self.ignored += bool(event.get("ignored"))

    def _discarded(self, event: ServerEvent) -> None:
        self.resolved += 1
        self.ignored += 1

    def _response_created(self, event: ServerEvent) -> None:
        if self.response_id is None:
            self.response_id = event.response_id

    def _audio(self, event: ServerEvent) -> None:
        if event.response_id == self.response_id:
            self.audio += event.audio

    def _response_done(self, event: ServerEvent) -> None:
        if event.response_id == self.response_id:
            self.done = dict(event.get("response") or {})

    def unanswerable(self) -> str | None:
        """Why no answer can come any more (the whole file was heard and every segment was ignored)."""
        settled = self.sent_all and not self.speech_open and self.started > 0 and self.resolved >= self.stopped
        if settled and self.response_id is None and self.ignored >= self.resolved:
            return "no answer: VITA classified everything it heard as background noise (or too short to be speech)"
        return None


class EventPrinter:
    """One line per event; consecutive deltas of one kind share a line, printed as they arrive."""

    STREAMS: ClassVar[dict[str, str]] = {
        "response.output_audio_transcript.delta": "transcript",
        "response.audio_transcript.delta": "transcript",
        "response.output_text.delta": "text",
        "response.text.delta": "text",
    }

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._stream: str | None = None

    def show(self, event: ServerEvent) -> None:
        if label := self.STREAMS.get(event.type):
            self._delta(label, str(event.get("delta") or ""))
        elif (line := describe(event)) is not None:
            self.line(line)

    def line(self, text: str) -> None:
        self.end()
        print(text, file=self.out, flush=True)

    def end(self) -> None:
        """Close an open delta line."""
        if self._stream is not None:
            print(file=self.out, flush=True)
            self._stream = None

    def _delta(self, label: str, delta: str) -> None:
        if self._stream != label:
            self.end()
            print(f"[{label}] ", end="", file=self.out)
            self._stream = label
        print(delta, end="", file=self.out, flush=True)


def describe(event: ServerEvent) -> str | None:
    """A one-line description of the events a person wants to see; None for the rest."""
    kind = event.type
    if kind == "input_audio_buffer.speech_started":
        return f"[speech started] at {event.get('audio_start_ms', 0) / 1000:.2f} s"
    if kind == "input_audio_buffer.speech_stopped":
        return f"[speech stopped] at {event.get('audio_end_ms', 0) / 1000:.2f} s"
    if kind == "vita.segment.classified":
        verdict = "ignored" if event.get("ignored") else "answering"
        reason = f" ({event.get('reason')})" if event.get("reason") else ""
        return f"[segment classified] {event.get('kind')}: {verdict}{reason}"
    if kind == "vita.segment.discarded":
        return "[segment discarded] too short to be speech"
    if kind == "response.created":
        return f"[response started] {event.response_id}"
    if kind == "response.done":
        response = event.get("response") or {}
        details = response.get("status_details") or {}
        reason = f" ({details.get('reason')})" if details.get("reason") else ""
        return f"[response done] {response.get('status')}{reason}"
    if kind == "error":
        return f"[server error] {event.error}"
    simple = {
        "vita.output.paused": "[output paused] the user is speaking",
        "vita.output.resumed": "[output resumed]",
        "output_audio_buffer.cleared": "[output cleared] the answer was interrupted",
        "conversation.item.truncated": f"[truncated] at {event.get('audio_end_ms')} ms",
        "vita.roles.swapped": f"[roles swapped] generator {event.get('generator')}, monitor {event.get('monitor')}",
    }
    return simple.get(kind)


def _save_reply(progress: Progress, args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    status = (progress.done or {}).get("status")
    if not args.text_only:
        if progress.audio:
            pcm = np.frombuffer(bytes(progress.audio), dtype="<i2")
            sf.write(str(args.out), pcm, OUTPUT_RATE, subtype="PCM_16")
            print(f"[saved] {len(pcm) / OUTPUT_RATE:.2f} s of speech to {args.out}", flush=True)
        else:
            print("[saved] nothing: the reply had no audio (the server may have no speech output)", flush=True)
    return 1 if status == "failed" else 0


# --- ask ----------------------------------------------------------------------------------------------


def run_ask(args: argparse.Namespace) -> int:
    """`vita-duplex ask`: one chat completion through the `openai` package; returns the exit status."""
    try:
        import openai
    except ImportError:
        return _fail("ask needs the openai package: pip install openai", 2)
    try:
        content = ask_content(args.text, args.image, args.audio)
    except InputError as exc:
        return _fail(str(exc), 2)
    url = _url(args)
    client = openai.OpenAI(base_url=url + "/v1", api_key=_api_key(args) or "none", max_retries=0,
                           timeout=args.timeout)
    request: dict[str, Any] = {"model": args.model, "messages": [{"role": "user", "content": content}]}
    if args.max_tokens:
        request["max_tokens"] = args.max_tokens
    try:
        _print_answer(client, request, args.stream)
    except openai.APIConnectionError as exc:
        return _fail(f"could not connect to {url}: is the server running? ({exc})")
    except openai.AuthenticationError as exc:
        return _fail(f"{AUTH_HINT} ({exc.message})")
    except openai.APIStatusError as exc:
        return _fail(f"the server answered HTTP {exc.status_code}: {exc.message}")
    except openai.APIError as exc:  # e.g. an error reported inside the stream
        return _fail(f"the server reported an error: {exc.message}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return 0


def _print_answer(client: Any, request: dict[str, Any], stream: bool) -> None:
    if not stream:
        reply = client.chat.completions.create(**request)
        print(reply.choices[0].message.content or "", flush=True)
        return
    for chunk in client.chat.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(flush=True)


def ask_content(text: str, images: list[Path], audio: Path | None) -> list[dict[str, Any]]:
    """OpenAI content parts: images as data URLs, audio as base64 WAV `input_audio`, then the text."""
    parts: list[dict[str, Any]] = []
    for path in images:
        data, mime = image_bytes(path)
        url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    if audio is not None:
        parts.append({"type": "input_audio", "input_audio": {"data": _wav_base64(audio), "format": "wav"}})
    parts.append({"type": "text", "text": text})
    return parts


def _wav_base64(path: Path) -> str:
    """The file itself when it is a WAV; other formats are decoded and re-encoded as 16-bit WAV."""
    import soundfile as sf

    samples, rate = read_audio(path)
    if path.suffix.lower() == ".wav":
        return base64.b64encode(path.read_bytes()).decode()
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(out.getvalue()).decode()
