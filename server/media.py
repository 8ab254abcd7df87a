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
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from models.audio_features import MIN_SAMPLES, SAMPLE_RATE, decode_audio, pcm16_to_float, to_mono_16k
from models.errors import InvalidAudioError, InvalidImageError, InvalidMediaError, InvalidVideoError
from models.image_tiling import as_image
from models.inputs import video_file_frames

from .wire import inline_data as wire_inline
from .wire.inline_data import DataURL

Resolver = Callable[[str, int], Awaitable[list[str]]]

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
    return urllib.parse.urlsplit(url).scheme.lower()


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


async def load_url_bytes(url: str, policy: FetchPolicy, *, kind: str, limits: tuple[int, float]) -> DataURL:
    """The bytes behind an image/video URL: a data: URL, or an allowed http(s) URL. Nothing local."""
    scheme = _url_scheme(url)
    if scheme == "data":
        parsed = parse_data_url(url, f"{kind} data URL")
        if len(parsed.data) > limits[0]:
            raise InvalidMediaError(f"{kind} is larger than the {limits[0] >> 20} MiB limit")
        return parsed
    if scheme in ("http", "https"):
        return DataURL("", await fetch_remote(url, policy, max_bytes=limits[0], timeout_s=limits[1]))
    if scheme == "file" or not scheme or len(scheme) == 1:  # "C:\..." parses as scheme "c"
        raise MediaURLRefusedError(f"local files and file:// URLs are never read; {_URLS_ACCEPTED}")
    raise MediaURLRefusedError(f"{kind} URL scheme {scheme!r} is not supported; {_URLS_ACCEPTED}")


async def load_image(url: str, policy: FetchPolicy) -> Image.Image:
    media = await load_url_bytes(url, policy, kind="image", limits=IMAGE_LIMITS)
    if media.mime and media.mime not in IMAGE_TYPES and media.mime != "application/octet-stream":
        raise InvalidImageError(f"image data URL has type {media.mime!r}; {_IMAGES_ACCEPTED}")
    # Decoding a large image takes a while: keep the event loop serving others meanwhile.
    return await asyncio.to_thread(as_image, media.data)


async def load_video_frames(url: str, policy: FetchPolicy) -> list[Image.Image]:
    media = await load_url_bytes(url, policy, kind="video", limits=VIDEO_LIMITS)
    if media.mime and not media.mime.startswith("video/") and media.mime != "application/octet-stream":
        raise InvalidVideoError(f"video data URL has type {media.mime!r}; {_VIDEOS_ACCEPTED}")
    if not media.data:
        raise InvalidVideoError(f"video is empty (0 bytes); {_VIDEOS_ACCEPTED}")
    # Always bytes, never a str: video_file_frames would read a str as a local path.
    return await asyncio.to_thread(video_file_frames, bytes(media.data))


def decode_input_audio(data: str, fmt: str, max_seconds: float | None = None) -> np.ndarray:
    """An `input_audio` part → 16 kHz mono float32. pcm16 is raw 16 kHz mono little-endian samples."""
    fmt = (fmt or "").strip().lower()
    if fmt not in AUDIO_FORMATS:
        raise InvalidAudioError(f"{_AUDIO_ACCEPTED}; got format {fmt!r}")
    raw = decode_base64(data, "input_audio.data")
    if fmt == "pcm16":
        clip = to_mono_16k(pcm16_to_float(raw), SAMPLE_RATE)
    else:
        try:
            clip = to_mono_16k(*decode_audio(raw))
        except InvalidAudioError as exc:
            raise InvalidAudioError(
                f"input_audio ({fmt}) could not be decoded: {exc}; {_AUDIO_ACCEPTED}"
            ) from None
    if len(clip) < MIN_SAMPLES:
        raise InvalidAudioError(
            f"input_audio is {1000 * len(clip) / SAMPLE_RATE:.0f} ms long; at least {1000 * MIN_SAMPLES // SAMPLE_RATE} ms "
            "is needed for one audio token"
        )
    if max_seconds is not None and len(clip) > max_seconds * SAMPLE_RATE:
        raise InvalidAudioError(
            f"input_audio is {len(clip) / SAMPLE_RATE:.1f} s long; at most {max_seconds:g} s is accepted"
        )
    return clip
