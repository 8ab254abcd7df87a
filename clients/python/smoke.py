"""Smoke check of a running vita-duplex server: what an operator runs after a rollout.

    vita-duplex smoke http://vita.example.internal:8000 --api-key "$KEY"
    python deploy/smoke.py http://127.0.0.1:8000            # same thing, from a checkout

Checks, in order, one line each with its timing:

* ``health``   GET /health answers 200 (the process is up);
* ``ready``    GET /ready answers 200 (the engines are loaded; ``--wait-ready S`` polls up to S seconds);
* ``metrics``  GET /metrics is Prometheus text with the server's metrics (what the scrape config reads);
* ``chat``     one POST /v1/chat/completions with a small generated PNG (data URL), through the ``openai``
  package, answers with non-empty text;
* ``realtime`` one WS /v1/realtime round trip: a spoken question (espeak-ng when the optional
  ``espeakng-loader`` package is installed, else a synthetic voiced signal, or ``--speech FILE``) must
  give ``input_audio_buffer.speech_started``, ``…speech_stopped`` and a ``response.done``.

Exit status 0 when every check passed, 1 otherwise (each failure names its check and says why), 2 for
bad arguments. When /health or /ready fails the later checks are skipped: they could only fail the same way.

The API key comes from ``--api-key``, else ``$VITA_API_KEY``, else the first of ``$VITA_API_KEYS`` (so
``kubectl exec … -- vita-duplex smoke http://127.0.0.1:8000`` inside a server pod needs no flag).
Nothing here depends on the tests; only the installed packages (numpy, Pillow, websockets, openai).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

CHECKS = ("health", "ready", "metrics", "chat", "realtime")
SAMPLE_RATE = 16_000  # the audio sent over the realtime socket: PCM16 mono at 16 kHz
QUESTION = "What is the weather like today?"


class CheckFailed(Exception):
    """A check's failure, with the message to print after ``FAIL <check>:``."""


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float = 0.0

    def line(self) -> str:
        timing = "" if self.status == "SKIP" else f" ({self.seconds:.2f} s)"
        return f"{self.status} {self.name}: {self.detail}{timing}"


# --- arguments ------------------------------------------------------------------------------------


def build_parser(prog: str = "vita-duplex smoke") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check a running vita-duplex server: health, readiness, metrics, a chat completion "
        "with an image, and a realtime round trip with speech. Exit status 0 when all pass.",
    )
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="API key (default: $VITA_API_KEY, else the first of $VITA_API_KEYS)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per check (default 60)")
    parser.add_argument("--wait-ready", type=float, default=0.0, metavar="S",
                        help="poll /ready for up to S seconds while the engines load (default 0: one try)")
    parser.add_argument("--speech", default="auto", metavar="SOURCE",
                        help="realtime speech: auto (espeak if installed, else synthetic), espeak, synthetic, "
                        "or a WAV/FLAC/OGG file")
    return parser


def api_key_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    if environ.get("VITA_API_KEY"):
        return environ["VITA_API_KEY"]
    keys = environ.get("VITA_API_KEYS", "").strip()
    if not keys:
        return None
    if keys.startswith("["):
        try:
            parsed = json.loads(keys)
        except ValueError:
            return None
        return str(parsed[0]) if parsed else None
    return next((k.strip() for k in keys.split(",") if k.strip()), None)


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path.removesuffix("/v1")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


# --- HTTP -----------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """A short, human reason for a connection failure."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):  # also socket.timeout and, from 3.11, asyncio.TimeoutError
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


def http_get(url: str, api_key: str | None, timeout: float) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise CheckFailed(f"could not connect to {url}: {_reason(exc)}") from None


def _short(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


def check_health(base: str, api_key: str | None, timeout: float) -> str:
    status, body = http_get(base + "/health", api_key, timeout)
    if status != 200:
        raise CheckFailed(f"GET /health answered HTTP {status}: {_short(body)}")
    return _short(body)


def check_ready(base: str, api_key: str | None, timeout: float, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        status, body = http_get(base + "/ready", api_key, timeout)
        if status == 200:
            return _short(body)
        try:
            state = json.loads(body)
        except ValueError:
            state = {}
        if isinstance(state, dict) and state.get("status") == "failed":
            raise CheckFailed(f"the engines failed to start: {state.get('error') or _short(body)}")
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:.0f} s" if wait_s > 0 else ""
            raise CheckFailed(f"not ready{waited}: GET /ready answered HTTP {status}: {_short(body)}")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def check_metrics(base: str, api_key: str | None, timeout: float) -> str:
    status, body = http_get(base + "/metrics", api_key, timeout)
    if status != 200:
        raise CheckFailed(f"GET /metrics answered HTTP {status}: {_short(body)}")
    text = body.decode("utf-8", "replace")
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    if "vita_sessions" not in names:
        raise CheckFailed(f"GET /metrics has no vita_sessions metric (got {len(names)} metric families)")
    return f"{len(names)} metric families"


# --- chat -----------------------------------------------------------------------------------------


def sample_png() -> bytes:
    """A 64x64 PNG: a red disc on a white background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(220, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def check_chat(base: str, api_key: str | None, timeout: float) -> str:
    try:
        import openai
    except ImportError:
        raise CheckFailed("the openai package is not installed (pip install openai)") from None
    client = openai.OpenAI(base_url=base + "/v1", api_key=api_key or "none", max_retries=0, timeout=timeout)
    url = base + "/v1/chat/completions"
    data_url = "data:image/png;base64," + base64.b64encode(sample_png()).decode()
    try:
        models = [m.id for m in client.models.list().data]
        parts: list[Any] = [
            {"type": "text", "text": "What colour is the shape in this picture?"},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]
        completion = client.chat.completions.create(
            model=models[0] if models else "vita",
            messages=[{"role": "user", "content": parts}],  # type: ignore[list-item,misc]
            max_tokens=16,
            temperature=0,
        )
    except openai.APITimeoutError:
        raise CheckFailed(f"no answer from {url} within {timeout:g} s") from None
    except openai.APIConnectionError as exc:
        raise CheckFailed(f"could not connect to {url}: {_reason(exc.__cause__ or exc)}") from None
    except openai.APIStatusError as exc:
        raise CheckFailed(f"HTTP {exc.status_code} from {exc.request.url.path}: {_api_message(exc)}") from None
    if not completion.choices:
        raise CheckFailed("the completion has no choices")
    choice = completion.choices[0]
    content = choice.message.content or ""
    if not content.strip():
        raise CheckFailed(f"empty answer (finish_reason={choice.finish_reason})")
    tokens = completion.usage.completion_tokens if completion.usage else "?"
    return f"model {completion.model!r}, {tokens} tokens, finish_reason={choice.finish_reason}: {content[:40]!r}"


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(exc, "message", exc))


# --- realtime -------------------------------------------------------------------------------------


def synthetic_speech(seconds: float = 1.6, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic voiced signal that voice-activity detectors take for speech: a glottal-like
    harmonic series (f0 ~120 Hz with intonation) shaped by vowel formants that change four times a
    second, in syllable-like amplitude envelopes. A pure tone is not speech to Silero; this is."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    f0 = 120.0 + 25.0 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    vowels = np.array([(700, 1200, 2600), (300, 2300, 3000), (500, 900, 2400), (400, 1900, 2600)], float)
    syllables_per_s = 4.0
    formants = vowels[(t * syllables_per_s).astype(int) % len(vowels)]  # (samples, 3)
    out = np.zeros_like(t)
    for k in range(1, 40):
        harmonic = k * f0
        gain = sum(w * np.exp(-0.5 * ((harmonic - formants[:, i]) / bw) ** 2)
                   for i, (w, bw) in enumerate(((1.0, 90.0), (0.5, 110.0), (0.5, 160.0))))
        out += gain / k * np.sin(k * phase)
    out *= np.clip(np.sin(np.pi * ((t * syllables_per_s) % 1.0)), 0, 1) ** 0.6
    out += 0.003 * np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    if rate == SAMPLE_RATE:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32, copy=False)


# A text-to-speech function (text -> (samples, rate)) for `--speech espeak`. The client imports only the wire
# layer: `vita-duplex smoke` (clients/cli.py) plugs in the server's espeak voice when it is installed.
Speaker = Callable[[str], tuple[np.ndarray, int]]
_speaker: Speaker | None = None


def _espeak_speech(text: str) -> np.ndarray:
    if _speaker is None:
        raise RuntimeError("no espeak voice plugged in (run it as `vita-duplex smoke`)")
    audio, rate = _speaker(text)
    return _resample(audio, rate)


def _file_speech(path: str) -> np.ndarray:
    import soundfile as sf

    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read --speech file {path!r}: {exc}") from None
    return _resample(audio.mean(axis=1), rate)


def speech_audio(source: str) -> tuple[np.ndarray, str]:
    """16 kHz float32 audio for the realtime check: silence, a spoken question, silence; and its name."""
    if source in ("auto", "espeak"):
        try:
            speech, name = _espeak_speech(QUESTION), "espeak"
        except Exception as exc:  # noqa: BLE001 - the GPL voice is an optional extra
            if source == "espeak":
                raise ValueError(f"espeak speech unavailable: {exc}") from None
            speech, name = synthetic_speech(), "synthetic voice"
    elif source == "synthetic":
        speech, name = synthetic_speech(), "synthetic voice"
    else:
        speech, name = _file_speech(source), os.path.basename(source)
    lead, tail = np.zeros(round(0.3 * SAMPLE_RATE), np.float32), np.zeros(round(1.2 * SAMPLE_RATE), np.float32)
    return np.concatenate([lead, speech.astype(np.float32), tail]), name


def _pcm16(audio: np.ndarray) -> bytes:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def _ws_url(base: str) -> str:
    parts = urllib.parse.urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/v1/realtime", "model=vita", ""))


async def _connect(url: str, api_key: str | None, timeout: float) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        from websockets.asyncio.client import connect  # websockets >= 13
    except ImportError:  # websockets 12: the legacy client
        from websockets.client import connect  # type: ignore[no-redef,attr-defined]

        return await connect(url, extra_headers=headers, max_size=None, open_timeout=timeout, close_timeout=2)
    return await connect(url, additional_headers=headers, max_size=None, open_timeout=timeout, close_timeout=2)


def _close_reason(exc: Any) -> str:
    frame = getattr(exc, "rcvd", None)
    if frame is None:
        return "the connection closed without a close frame"
    return f"the server closed the connection: code {frame.code}" + (f" ({frame.reason})" if frame.reason else "")


@dataclass
class _Seen:
    at: dict[str, float]
    text_chars: int = 0
    audio_bytes: int = 0
    note: str = ""
    response: dict[str, Any] | None = None


async def _round_trip(ws: Any, audio: np.ndarray, seen: _Seen, started: float) -> None:
    async def send(event: dict[str, Any]) -> None:
        await ws.send(json.dumps(event))

    first = json.loads(await ws.recv())
    if first.get("type") != "session.created":
        raise CheckFailed(f"expected session.created first, got {_short(json.dumps(first).encode())}")
    # Text replies: a spoken reply completes only once played in real time, which for a long answer
    # is minutes; the round trip (VAD → engine → answer) is what this check is about.
    await send({"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["text"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}}}}})
    pcm = _pcm16(audio)
    step = SAMPLE_RATE // 10 * 2  # 100 ms per event
    for i in range(0, len(pcm), step):
        await send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
    while True:
        event = json.loads(await ws.recv())
        kind = event.get("type", "")
        if kind == "error":
            error = event.get("error") or {}
            raise CheckFailed(f"server error {error.get('code')}: {error.get('message')}")
        if kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"):
            seen.at.setdefault(kind.rsplit(".", 1)[1], time.monotonic() - started)
        elif not seen.note and (kind == "vita.segment.discarded"
                                or (kind == "vita.segment.classified" and event.get("ignored"))):
            # The audio path worked but this segment gets no answer by design (too short for the VAD, or
            # judged background noise by VITA): check generation with a typed question on the same socket.
            why = "too short" if kind == "vita.segment.discarded" else f"{event.get('kind')} by the model"
            seen.note = f"; speech segment judged {why}, typed follow-up answered"
            await send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": QUESTION}]}})
            await send({"type": "response.create"})
        elif kind in ("response.output_text.delta", "response.output_audio_transcript.delta"):
            seen.text_chars += len(event.get("delta", ""))
        elif kind == "response.output_audio.delta":
            seen.audio_bytes += len(base64.b64decode(event.get("delta", "")))
        elif kind == "response.done":
            seen.at["response.done"] = time.monotonic() - started
            seen.response = event.get("response") or {}
            if seen.response.get("status") == "failed":
                raise CheckFailed(f"response failed: {json.dumps(seen.response.get('status_details'))}")
            return


async def _realtime(base: str, api_key: str | None, timeout: float, audio: np.ndarray, source: str) -> str:
    import websockets

    url = _ws_url(base)
    started = time.monotonic()
    seen = _Seen(at={})
    try:
        ws = await _connect(url, api_key, timeout)
    except (TimeoutError, OSError) as exc:
        raise CheckFailed(f"could not connect to {url}: {_reason(exc)}") from None
    except websockets.exceptions.InvalidHandshake as exc:
        raise CheckFailed(f"websocket handshake with {url} failed: {exc}") from None
    try:
        await asyncio.wait_for(_round_trip(ws, audio, seen, started), timeout)
    except TimeoutError:
        missing = [k for k in ("speech_started", "speech_stopped", "response.done") if k not in seen.at]
        hint = " (the server's VAD heard no speech)" if "speech_started" in missing else ""
        raise CheckFailed(f"no {', '.join(missing)} within {timeout:g} s{hint}") from None
    except websockets.exceptions.ConnectionClosed as exc:
        raise CheckFailed(_close_reason(exc)) from None
    finally:
        await ws.close()
    missing = [k for k in ("speech_started", "speech_stopped") if k not in seen.at]
    if missing:
        raise CheckFailed(f"response.done arrived without {' and '.join(missing)}")
    response = seen.response or {}
    status = (response.get("status_details") or {}).get("reason") or response.get("status")
    out_audio = f", {seen.audio_bytes / 2 / 24000:.1f} s audio" if seen.audio_bytes else ""
    at = seen.at
    return (f"speech_started {at['speech_started']:.2f} s, speech_stopped {at['speech_stopped']:.2f} s, "
            f"response.done {at['response.done']:.2f} s ({status}, {seen.text_chars} text chars{out_audio}; "
            f"speech: {source}{seen.note})")


def check_realtime(base: str, api_key: str | None, timeout: float, speech: tuple[np.ndarray, str]) -> str:
    return asyncio.run(_realtime(base, api_key, timeout, *speech))


# --- driver ---------------------------------------------------------------------------------------


def run_check(name: str, fn: Callable[[], str]) -> Result:
    started = time.monotonic()
    try:
        detail = fn()
    except CheckFailed as exc:
        return Result(name, "FAIL", str(exc), time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 - a bug or an odd answer: still one clear line, no traceback
        return Result(name, "FAIL", f"{type(exc).__name__}: {exc}", time.monotonic() - started)
    return Result(name, "PASS", detail, time.monotonic() - started)


def main(argv: list[str] | None = None, prog: str = "vita-duplex smoke", speaker: Speaker | None = None) -> int:
    global _speaker  # one command-line process, set once before the checks
    _speaker = speaker
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        base = base_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        speech = speech_audio(args.speech)
    except ValueError as exc:
        parser.error(str(exc))
    key = args.api_key or api_key_from_env()
    timeout = args.timeout

    plan: list[tuple[str, Callable[[], str]]] = [
        ("health", lambda: check_health(base, key, timeout)),
        ("ready", lambda: check_ready(base, key, timeout, args.wait_ready)),
        ("metrics", lambda: check_metrics(base, key, timeout)),
        ("chat", lambda: check_chat(base, key, timeout)),
        ("realtime", lambda: check_realtime(base, key, timeout, speech)),
    ]
    results: list[Result] = []
    blocked: str | None = None
    for name, fn in plan:
        if blocked:
            result = Result(name, "SKIP", blocked)
        else:
            result = run_check(name, fn)
            if result.status == "FAIL" and name in ("health", "ready"):
                blocked = "server is down" if name == "health" else "server is not ready"
        results.append(result)
        print(result.line(), flush=True)
    failed = [r.name for r in results if r.status == "FAIL"]
    if failed:
        print(f"smoke: FAILED {', '.join(failed)} against {base}", flush=True)
        return 1
    print(f"smoke: all {len(results)} checks passed against {base}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
