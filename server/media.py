"""Media from chat content parts: data URLs, allow-listed http(s) URLs and base64 audio, decoded for VITA.

Remote URLs are off unless the operator allow-lists hosts (`media_url_allowlist`): a server that fetches
whatever URL a client names is a server-side request forgery hole into the operator's network. Even for
allow-listed hosts we follow no redirects (a redirect could point anywhere), cap size and time, pin the
connection to the address we checked (so DNS cannot change its answer between the check and the fetch),
and refuse private, loopback and link-local addresses unless the operator named that exact host.
Local paths and file:// URLs are never read.

Allow-list entries: "example.com" (that host), "*.example.com" (its subdomains), "*" (any public host).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import soundfile as sf
from PIL import Image

from models.audio_features import MIN_SAMPLES, SAMPLE_RATE, pcm16_to_float, to_mono_16k
from models.errors import InvalidAudioError, InvalidImageError, InvalidMediaError, InvalidVideoError
from models.image_tiling import decode_image
from models.video_frames import decode_video_frames, square_frame

from . import limits
from .wire import inline_data as wire_inline
from .wire.inline_data import DataURL

Resolver = Callable[[str, int], Awaitable[list[str]]]
T = TypeVar("T")
# Runs a blocking call off the event loop: AppState.offload (the bounded executor) in the server.
Offload = Callable[..., Awaitable[Any]]

IMAGE_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/x-ms-bmp"}
)
AUDIO_FORMATS = ("wav", "pcm16", "mp3", "flac", "ogg")
# Like vLLM's media fetch timeouts (image 5 s, video 30 s), plus size caps.
IMAGE_LIMITS = (20 << 20, 5.0)
VIDEO_LIMITS = (64 << 20, 30.0)

_IMAGES_ACCEPTED = "images must be PNG, JPEG, WEBP, GIF or BMP"
_VIDEOS_ACCEPTED = "videos must be MP4 or WEBM (any container OpenCV's FFmpeg decodes)"
_URLS_ACCEPTED = "send a data: URL (base64) or an http(s) URL of a host the operator allow-listed"
_AUDIO_ACCEPTED = (
    "input_audio.format must be wav, pcm16 (16 kHz mono little-endian), mp3, flac or ogg, "
    "with base64 bytes in input_audio.data"
)
REMOTE_DISABLED = (
    "remote media URLs are disabled; send a data: URL or ask the operator to allow-list the host"
)


class MediaURLRefusedError(InvalidMediaError):
    """A media URL this server will not read (scheme, host or address not allowed)."""


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # IPv6 link-local answers carry a zone ("fe80::1%eth0"); the address is what we check.
    return [str(info[4][0]).split("%")[0] for info in infos]


@dataclass(frozen=True)
class FetchPolicy:
    """Which remote hosts media may come from. `resolve` is replaceable so tests need no DNS."""

    allowlist: tuple[str, ...] = ()
    resolve: Resolver = field(default=_system_resolve, compare=False)

    @classmethod
    def of(cls, hosts: Sequence[str]) -> FetchPolicy:
        return cls(tuple(_norm_host(h) for h in hosts if h.strip()))

    def allows(self, host: str) -> bool:
        host = _norm_host(host)
        for entry in self.allowlist:
            if entry == "*" or entry == host:
                return True
            if entry.startswith("*.") and host.endswith(entry[1:]):
                return True
        return False

    def named_exactly(self, host: str) -> bool:
        """Only a host the operator named itself may resolve to a private address (e.g. an internal CDN)."""
        return _norm_host(host) in self.allowlist


def _norm_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


# --- data URLs and base64 (decoded by the wire's one decoder; its errors become media errors here) ------


def decode_base64(text: str, what: str) -> bytes:
    try:
        return wire_inline.decode_base64(text, what)
    except wire_inline.InlineDataError as exc:
        raise InvalidMediaError(str(exc)) from None


def parse_data_url(url: str, what: str = "data URL") -> DataURL:
    try:
        return wire_inline.parse_data_url(url, what)
    except wire_inline.InlineDataError as exc:
        raise InvalidMediaError(str(exc)) from None


# --- remote fetch ---------------------------------------------------------------------------------


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not ip.is_multicast


def _url_scheme(url: str) -> str:
    # A scheme is short: never split a multi-MB data URL just to read it.
    return urllib.parse.urlsplit(url[:64]).scheme.lower()


async def fetch_remote(url: str, policy: FetchPolicy, *, max_bytes: int, timeout_s: float) -> bytes:
    """GET an allow-listed http(s) URL: no redirects, at most `max_bytes`, within `timeout_s` in total."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise MediaURLRefusedError(f"only http(s) URLs with a host can be fetched; {_URLS_ACCEPTED}")
    host = _norm_host(parts.hostname)
    if not policy.allowlist:
        raise MediaURLRefusedError(REMOTE_DISABLED)
    if not policy.allows(host):
        raise MediaURLRefusedError(
            f"media host {host!r} is not in the server's allow-list; send a data: URL or ask the operator "
            "to allow-list the host"
        )
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise MediaURLRefusedError(f"media URL has an invalid port; {_URLS_ACCEPTED}") from None
    address = await _checked_address(host, port, policy)
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel on 3.11
            return await _get(parts, host, address, port, max_bytes)
    except TimeoutError:
        raise InvalidMediaError(f"fetching media from {host!r} took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise InvalidMediaError(f"fetching media from {host!r} failed: {type(exc).__name__}: {exc}") from None


async def _checked_address(host: str, port: int, policy: FetchPolicy) -> str:
    try:
        addresses = await policy.resolve(host, port)
    except OSError as exc:
        raise InvalidMediaError(f"media host {host!r} could not be resolved: {exc}") from None
    if not addresses:
        raise InvalidMediaError(f"media host {host!r} has no addresses")
    if not policy.named_exactly(host):
        private = [a for a in addresses if not _is_public(a)]
        if private:
            raise MediaURLRefusedError(
                f"media host {host!r} resolves to a private, loopback or link-local address ({private[0]}); "
                "such hosts must be allow-listed by their exact name"
            )
    return addresses[0]


async def _get(parts: urllib.parse.SplitResult, host: str, address: str, port: int, max_bytes: int) -> bytes:
    # Connect to the address we checked; Host header and TLS server name (SNI and certificate check)
    # stay the original host's.
    literal = f"[{address}]" if ":" in address else address
    pinned = parts._replace(netloc=f"{literal}:{port}", fragment="").geturl()
    host_header = parts.netloc.rpartition("@")[2]  # never forward userinfo
    extensions = {"sni_hostname": host} if parts.scheme.lower() == "https" else {}
    # trust_env=False: an HTTP(S)_PROXY from the environment must not reroute the pinned connection.
    async with (
        httpx.AsyncClient(follow_redirects=False, trust_env=False) as client,
        client.stream("GET", pinned, headers={"Host": host_header}, extensions=extensions) as resp,
    ):
        if resp.is_redirect:
            raise MediaURLRefusedError(
                f"media URL on {host!r} answered with a redirect ({resp.status_code}); redirects are not "
                "followed: send the final URL"
            )
        if resp.status_code != 200:
            raise InvalidMediaError(f"media URL on {host!r} answered HTTP {resp.status_code}, not 200")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise InvalidMediaError(_too_big(host, max_bytes))
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise InvalidMediaError(_too_big(host, max_bytes))
        return bytes(body)


def _too_big(host: str, max_bytes: int) -> str:
    return f"media from {host!r} is larger than the {max_bytes >> 20} MiB limit"


# --- per modality ------------------------------------------------------------------------------


async def load_url_bytes(url: str, policy: FetchPolicy, *, kind: str, limits: tuple[int, float],
                         run: Offload = asyncio.to_thread) -> DataURL:
    """The bytes behind an image/video URL: a data: URL (decoded through `run`: MBs of base64 take a while),
    or an allowed http(s) URL. Nothing local."""
    scheme = _url_scheme(url)
    if scheme == "data":
        parsed = await run(parse_data_url, url, f"{kind} data URL")
        if len(parsed.data) > limits[0]:
            raise InvalidMediaError(f"{kind} is larger than the {limits[0] >> 20} MiB limit")
        return parsed
    if scheme in ("http", "https"):
        return DataURL("", await fetch_remote(url, policy, max_bytes=limits[0], timeout_s=limits[1]))
    if scheme == "file" or not scheme or len(scheme) == 1:  # "C:\..." parses as scheme "c"
        raise MediaURLRefusedError(f"local files and file:// URLs are never read; {_URLS_ACCEPTED}")
    raise MediaURLRefusedError(f"{kind} URL scheme {scheme!r} is not supported; {_URLS_ACCEPTED}")


@dataclass(frozen=True)
class VisionGeometry:
    """What the vision tower sees of an image: `image_size`² tiles, `min_tiles`..`max_tiles` of them."""

    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12

    @classmethod
    def of(cls, config: Any) -> VisionGeometry:
        """From a checkpoint's `VitaConfig` (VITA's own tiling where a config leaves it out)."""
        return cls(config.vision_config.image_size, getattr(config, "min_dynamic_patch", cls.min_tiles),
                   getattr(config, "max_dynamic_patch", cls.max_tiles))


def check_image_mime(mime: str, what: str = "image data URL") -> None:
    """A data URL's declared type must be an image type we decode (or say nothing / octet-stream)."""
    if mime and mime not in IMAGE_TYPES and mime != "application/octet-stream":
        raise InvalidImageError(f"{what} has type {mime!r}; {_IMAGES_ACCEPTED}")


def image_at_model_size(data: bytes, geometry: VisionGeometry) -> Image.Image:
    """Encoded bytes → RGB image no larger than the tile grid dynamic tiling resizes it to (the pixel count
    checked from the header first). The tiles are what they would be from the upload; only the
    thumbnail of a multi-tile image is made from the grid-sized image instead of the upload's pixels."""
    image = decode_image(data, max_pixels=limits.MAX_IMAGE_PIXELS)
    width, height = limits.tile_grid_size(image.width, image.height, image_size=geometry.image_size,
                                          min_tiles=geometry.min_tiles, max_tiles=geometry.max_tiles)
    if image.width * image.height > width * height:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def frame_at_model_size(data: bytes, image_size: int) -> Image.Image:
    """A camera frame → the one `image_size`² tile the model sees of it (VITA's short-side resize and centre
    crop, exactly what the prompt would make of the upload), the pixel count checked from the header."""
    return square_frame(decode_image(data, max_pixels=limits.MAX_FRAME_PIXELS), image_size)


DEFAULT_GEOMETRY = VisionGeometry()  # VITA's: 448² tiles, 1 to 12 of them


async def load_image(url: str, policy: FetchPolicy, geometry: VisionGeometry = DEFAULT_GEOMETRY,
                     run: Offload = asyncio.to_thread) -> Image.Image:
    media = await load_url_bytes(url, policy, kind="image", limits=IMAGE_LIMITS, run=run)
    check_image_mime(media.mime)
    # Decoding a large image takes a while: keep the event loop serving others meanwhile.
    return await run(image_at_model_size, media.data, geometry)


def video_frames_at_model_size(data: bytes, image_size: int) -> list[Image.Image]:
    """VITA's offline frame sampling; each frame cut to its one tile as it is decoded, so at most one frame
    at the clip's own resolution is held at a time."""
    return decode_video_frames(data, fps=1.0, min_frames=4, max_frames=16, max_pixels=limits.MAX_FRAME_PIXELS,
                               transform=lambda frame: square_frame(frame, image_size))


async def load_video_frames(url: str, policy: FetchPolicy, image_size: int = 448,
                            run: Offload = asyncio.to_thread) -> list[Image.Image]:
    media = await load_url_bytes(url, policy, kind="video", limits=VIDEO_LIMITS, run=run)
    if media.mime and not media.mime.startswith("video/") and media.mime != "application/octet-stream":
        raise InvalidVideoError(f"video data URL has type {media.mime!r}; {_VIDEOS_ACCEPTED}")
    if not media.data:
        raise InvalidVideoError(f"video is empty (0 bytes); {_VIDEOS_ACCEPTED}")
    # Always bytes, never a str: the decoder would read a str as a local path.
    return await run(video_frames_at_model_size, bytes(media.data), image_size)


class _UndecodableAudio(InvalidAudioError):
    """Not audio we can read (as opposed to audio refused for a limit)."""


_BLOCK_FRAMES = 1 << 16  # frames decoded at a time: 64 Ki x 64 channels x 4 B = 16 MiB at most


def decode_clip(raw: bytes, max_seconds: float, what: str = "audio") -> np.ndarray:
    """WAV/FLAC/OGG/MP3 bytes → 16 kHz mono float32, refusing from the header, before anything is decoded,
    a rate, channel count or length the server does not take (server/limits.py). Decoding goes block by
    block keeping the first channel (as VITA does) and stops past `max_seconds` whatever the header said."""
    if not raw:
        raise _UndecodableAudio(f"{what} is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
            problem = limits.audio_rate_problem(rate)
            if problem is None and not 1 <= channels <= limits.MAX_AUDIO_CHANNELS:
                problem = f"{what} has {channels} channels; at most {limits.MAX_AUDIO_CHANNELS} are accepted"
            if problem is None and frames > 0:
                problem = limits.audio_duration_problem(frames, rate, max_seconds, what)
            if problem is not None:
                raise InvalidAudioError(problem)
            cap = int(max_seconds * rate)
            blocks: list[np.ndarray] = []
            got = 0
            while got <= cap:
                block = f.read(frames=min(_BLOCK_FRAMES, cap + 1 - got), dtype="float32", always_2d=True)
                if not len(block):
                    break
                blocks.append(np.ascontiguousarray(block[:, 0]))
                got += len(block)
            if got > cap:
                raise InvalidAudioError(f"{what} is longer than {max_seconds:g} s; at most {max_seconds:g} s is accepted")
    except InvalidAudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _UndecodableAudio(f"{what} could not be decoded: {exc}") from None
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return to_mono_16k(mono, rate)


def decode_input_audio(data: str, fmt: str, max_seconds: float = 60.0) -> np.ndarray:
    """An `input_audio` part → 16 kHz mono float32. pcm16 is raw 16 kHz mono little-endian samples."""
    fmt = (fmt or "").strip().lower()
    if fmt not in AUDIO_FORMATS:
        raise InvalidAudioError(f"{_AUDIO_ACCEPTED}; got format {fmt!r}")
    raw = decode_base64(data, "input_audio.data")
    if fmt == "pcm16":
        problem = limits.audio_duration_problem(len(raw) // 2, SAMPLE_RATE, max_seconds, "input_audio")
        if problem is not None:
            raise InvalidAudioError(problem)
        clip = to_mono_16k(pcm16_to_float(raw), SAMPLE_RATE)
    else:
        try:
            clip = decode_clip(raw, max_seconds, f"input_audio ({fmt})")
        except _UndecodableAudio as exc:
            raise InvalidAudioError(f"{exc}; {_AUDIO_ACCEPTED}") from None
    if len(clip) < MIN_SAMPLES:
        raise InvalidAudioError(
            f"input_audio is {1000 * len(clip) / SAMPLE_RATE:.0f} ms long; at least {1000 * MIN_SAMPLES // SAMPLE_RATE} ms "
            "is needed for one audio token"
        )
    if len(clip) > max_seconds * SAMPLE_RATE:  # resampling rounds up: a clip at the limit may gain a sample
        clip = clip[: int(max_seconds * SAMPLE_RATE)]
    return clip
