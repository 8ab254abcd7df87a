"""server/media.py without a server: data URLs, base64, audio formats, and which URLs are (never) fetched."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import soundfile as sf

from models.errors import InvalidAudioError, InvalidImageError, InvalidMediaError
from server.media import (
    REMOTE_DISABLED,
    FetchPolicy,
    MediaURLRefusedError,
    _is_public,
    decode_base64,
    decode_input_audio,
    fetch_remote,
    load_image,
    load_video_frames,
    parse_data_url,
)

DATA = Path(__file__).parent / "data"
PNG = (DATA / "house.png").read_bytes()
NO_REMOTE = FetchPolicy()


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def fixed(address: str):
    async def resolve(host: str, port: int) -> list[str]:
        return [address]

    return resolve


# --- data URLs and base64 ---------------------------------------------------------------------------


def test_data_url_base64_and_mime() -> None:
    parsed = parse_data_url(data_url("image/PNG", PNG))
    assert parsed.mime == "image/png" and parsed.data == PNG


def test_data_url_percent_encoded_and_params() -> None:
    parsed = parse_data_url("data:text/plain;charset=utf-8,hello%20world")
    assert parsed.mime == "text/plain" and parsed.data == b"hello world"


def test_data_url_without_comma_is_refused() -> None:
    with pytest.raises(InvalidMediaError, match="no ','"):
        parse_data_url("data:image/png;base64")


def test_base64_tolerates_whitespace_padding_and_urlsafe() -> None:
    raw = bytes(range(250, 256)) + b"\xfb\xff"
    std = base64.b64encode(raw).decode()
    assert decode_base64(std[:4] + "\n " + std[4:], "x") == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("="), "x") == raw


@pytest.mark.parametrize("text", ["not base64!!", "abc$", ""])
def test_bad_base64_is_refused(text: str) -> None:
    with pytest.raises(InvalidMediaError, match="base64|empty"):
        decode_base64(text, "image data URL")


# --- images and video ----------------------------------------------------------------------------------


async def test_image_data_url_decodes() -> None:
    image = await load_image(data_url("image/png", PNG), NO_REMOTE)
    assert image.size == (640, 400) and image.mode == "RGB"


async def test_image_bad_base64_names_what_is_accepted() -> None:
    with pytest.raises(InvalidMediaError, match="base64"):
        await load_image("data:image/png;base64,@@@not-base64@@@", NO_REMOTE)


async def test_image_corrupt_bytes_and_wrong_type() -> None:
    with pytest.raises(InvalidImageError, match="PNG"):
        await load_image(data_url("image/png", b"definitely not an image"), NO_REMOTE)
    with pytest.raises(InvalidImageError, match="video/mp4"):
        await load_image(data_url("video/mp4", PNG), NO_REMOTE)


def make_mp4(path: Path, frames: int = 8, fps: float = 4.0, size: int = 64) -> bytes:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (size, size))
    for i in range(frames):
        frame = np.full((size, size, 3), (i * 30) % 255, np.uint8)
        frame[: size // 2, : size // 2, 2] = 200
        writer.write(frame)
    writer.release()
    return path.read_bytes()


async def test_video_data_url_gives_frames(tmp_path: Path) -> None:
    frames = await load_video_frames(data_url("video/mp4", make_mp4(tmp_path / "clip.mp4")), NO_REMOTE)
    assert 1 <= len(frames) <= 16
    assert frames[0].mode == "RGB"


async def test_video_garbage_is_refused() -> None:
    with pytest.raises(InvalidMediaError, match="video"):
        await load_video_frames(data_url("video/mp4", b"\x00" * 64), NO_REMOTE)


# --- URLs that are never read ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["/etc/passwd", "file:///etc/passwd", "FILE://localhost/etc/hosts", "house.png", r"C:\media\house.png"],
)
async def test_local_files_are_never_read(url: str) -> None:
    anything = FetchPolicy.of(["*"])
    with pytest.raises(MediaURLRefusedError, match="local files"):
        await load_image(url, anything)
    with pytest.raises(MediaURLRefusedError, match="local files"):
        await load_video_frames(url, anything)


async def test_other_schemes_are_refused() -> None:
    with pytest.raises(MediaURLRefusedError, match="'ftp' is not supported"):
        await load_image("ftp://example.com/house.png", FetchPolicy.of(["*"]))


async def test_remote_urls_are_off_by_default() -> None:
    with pytest.raises(MediaURLRefusedError) as info:
        await load_image("https://example.com/house.png", NO_REMOTE)
    assert str(info.value) == REMOTE_DISABLED


async def test_host_not_in_allowlist_is_refused() -> None:
    policy = FetchPolicy.of(["example.com"])
    for url in ("https://evil.example.org/x.png", "https://sub.example.com/x.png", "http://localhost/x.png"):
        with pytest.raises(MediaURLRefusedError, match="not in the server's allow-list"):
            await load_image(url, policy)


def test_allowlist_patterns() -> None:
    policy = FetchPolicy.of(["Example.com.", "*.cdn.test"])
    assert policy.allows("example.com") and policy.allows("EXAMPLE.COM")
    assert policy.allows("a.cdn.test") and policy.allows("b.a.cdn.test")
    assert not policy.allows("cdn.test") and not policy.allows("notexample.com")
    assert policy.named_exactly("example.com") and not policy.named_exactly("a.cdn.test")


async def test_private_address_refused_unless_host_named_exactly() -> None:
    # "localhost" really resolves to a loopback address; a wildcard does not vouch for it.
    with pytest.raises(MediaURLRefusedError, match="private, loopback or link-local"):
        await fetch_remote("http://localhost:9/x.png", FetchPolicy.of(["*"]), max_bytes=1024, timeout_s=2)
    # Only example.com is allow-listed: localhost is refused before any connection.
    with pytest.raises(MediaURLRefusedError):
        await fetch_remote(
            "http://localhost:9/x.png", FetchPolicy.of(["example.com"]), max_bytes=1024, timeout_s=2
        )
    # A wildcard-allowed name that DNS points at the cloud metadata service or a LAN address.
    for address in ("169.254.169.254", "10.1.2.3", "::1", "::ffff:127.0.0.1", "fe80::1"):
        policy = FetchPolicy(("*.example.com",), resolve=fixed(address))
        with pytest.raises(MediaURLRefusedError, match="private"):
            await fetch_remote("https://img.example.com/x.png", policy, max_bytes=1024, timeout_s=2)


def test_public_addresses() -> None:
    assert _is_public("93.184.216.34") and _is_public("2606:2800:220:1:248:1893:25c8:1946")
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.1.1",
        "0.0.0.0",
        "::1",
        "100.64.0.1",
        "224.0.0.1",
        "fd00::1",
    ):
        assert not _is_public(address), address


# --- fetching from an allow-listed host (a local server the test runs) --------------------------------------


class _Handler(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers.get("Host", ""))
        if self.path == "/house.png":
            self._send(200, PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/house.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big":
            self._send(200, b"x" * 4096)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def media_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


async def test_exactly_allowlisted_private_host_is_fetched_on_the_checked_address(media_server: int) -> None:
    # media.test is named exactly, so its private address is allowed; the connection goes to the address we
    # checked while the Host header keeps the name.
    policy = FetchPolicy(("media.test",), resolve=fixed("127.0.0.1"))
    image = await load_image(f"http://media.test:{media_server}/house.png", policy)
    assert image.size == (640, 400)
    assert _Handler.hosts[-1] == f"media.test:{media_server}"


async def test_redirects_size_cap_and_http_errors(media_server: int) -> None:
    policy = FetchPolicy.of(["127.0.0.1"])
    base = f"http://127.0.0.1:{media_server}"
    with pytest.raises(MediaURLRefusedError, match="redirect"):
        await fetch_remote(base + "/redirect", policy, max_bytes=1 << 20, timeout_s=5)
    with pytest.raises(InvalidMediaError, match="larger than"):
        await fetch_remote(base + "/big", policy, max_bytes=1024, timeout_s=5)
    with pytest.raises(InvalidMediaError, match="HTTP 404"):
        await fetch_remote(base + "/missing", policy, max_bytes=1024, timeout_s=5)
    assert await fetch_remote(base + "/big", policy, max_bytes=8192, timeout_s=5) == b"x" * 4096


# --- input_audio ------------------------------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def encoded(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    out = io.BytesIO()
    sf.write(out, wave, rate, format=fmt)
    return out.getvalue()


def test_wav_audio_is_16k_mono() -> None:
    clip = decode_input_audio(b64((DATA / "beckett.wav").read_bytes()), "wav")
    assert clip.dtype == np.float32 and clip.ndim == 1
    assert abs(len(clip) / 16000 - 9.963) < 0.01


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3"])
def test_compressed_formats_resampled(fmt: str) -> None:
    t = np.arange(44100) / 44100
    stereo = (
        np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 220 * t)], axis=1).astype(np.float32) * 0.5
    )
    clip = decode_input_audio(b64(encoded(stereo, 44100, fmt.upper())), fmt)
    assert clip.ndim == 1 and abs(len(clip) - 16000) < 2000


def test_pcm16_raw_and_odd_length() -> None:
    samples = (np.sin(np.arange(1600) / 5) * 10000).astype("<i2")
    clip = decode_input_audio(b64(samples.tobytes()), "PCM16")
    assert len(clip) == 1600 and np.allclose(clip, samples / 32768.0)
    with pytest.raises(InvalidAudioError, match="even number of bytes"):
        decode_input_audio(b64(samples.tobytes()[:-1]), "pcm16")


def test_audio_refusals_name_what_is_accepted() -> None:
    with pytest.raises(InvalidAudioError, match="wav, pcm16 .* mp3, flac or ogg.*'aac'"):
        decode_input_audio(b64(b"\x00\x01"), "aac")
    with pytest.raises(InvalidAudioError, match="could not be decoded.*input_audio.format must be"):
        decode_input_audio(b64(b"RIFF garbage that is no wav"), "wav")
    with pytest.raises(InvalidMediaError, match="base64"):
        decode_input_audio("%%%", "wav")
    with pytest.raises(InvalidAudioError, match="at most 1 s"):
        decode_input_audio(b64((DATA / "beckett.wav").read_bytes()), "wav", max_seconds=1)
