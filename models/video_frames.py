"""Video preprocessing: frame sampling for uploaded clips and for the live webcam stream.

Uploaded clips follow VITA's offline demo (`video_audio_demo.py` `_get_rawvideo_dec`): one candidate every
round(container_fps / fps) frames, then `np.linspace(..., dtype=int)` over the candidates down to 16 or up
to 4 (short clips repeat frames). Live streams use the interactive demo's policy: a few frames spread
uniformly over the last couple of seconds. Every frame becomes one 448x448 tile (max_dynamic_patch=1, no
thumbnail), i.e. 256 LLM tokens, made as VITA's CLIPImageProcessor does: short side to 448 (long side
truncated with int()), bicubic, centre crop.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image

from models.errors import InvalidVideoError
from models.image_tiling import as_image, normalize_tiles

T = TypeVar("T")

_ACCEPTED = "video must be a container OpenCV's FFmpeg can decode (MP4, WEBM, AVI or MKV)"


def decode_video_frames(
    data_or_path: bytes | str | os.PathLike[str],
    *,
    fps: float = 1.0,
    min_frames: int = 4,
    max_frames: int = 16,
    max_pixels: int | None = None,
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> list[Image.Image]:
    """Decode a clip (bytes or a path) and return between min_frames and max_frames RGB frames.

    Short clips give min_frames with repeats (see `sample_frame_indices`); fewer come back only when
    frames that the container announced cannot be decoded. `max_pixels` refuses a clip whose declared
    frame size is larger, before any frame is decoded; `transform` is applied to each frame as it is
    decoded (e.g. `square_frame`), so only one frame at the clip's own size is held at a time.
    """
    if not fps > 0 or not 1 <= min_frames <= max_frames:
        raise ValueError(
            f"need fps > 0 and 1 <= min_frames <= max_frames; got {fps}, {min_frames}, {max_frames}"
        )
    with _video_path(data_or_path) as path:
        if max_pixels is not None:
            _check_frame_size(path, max_pixels)
        total, container_fps = _count_frames(path)
        if total == 0:
            raise InvalidVideoError(f"video has no decodable frames; {_ACCEPTED}")
        wanted = sample_frame_indices(
            total, container_fps, fps=fps, min_frames=min_frames, max_frames=max_frames
        )
        frames = _read_frames(path, wanted, transform)
    if not frames:
        raise InvalidVideoError(f"video frames could not be decoded; {_ACCEPTED}")
    return frames


def sample_frame_indices(
    total: int,
    container_fps: float,
    *,
    fps: float = 1.0,
    min_frames: int = 4,
    max_frames: int = 16,
) -> list[int]:
    """Frame indices to decode, in order and possibly repeated, exactly as VITA's `_get_rawvideo_dec`.

    Candidates are ``range(0, total, stride)`` with ``stride = int(round(container_fps / fps))`` (Python's
    round: half to even). More than max_frames or fewer than min_frames candidates are replaced by
    ``candidates[k] for k in np.linspace(0, len - 1, num, dtype=int)`` (truncating), so a clip under
    min_frames seconds repeats frames: 2 s at 30 fps -> [0, 0, 0, 30].
    Departures, where upstream would crash: an unknown container fps (0, NaN) makes every frame a
    candidate, and a stride that rounds to 0 (fps below 0.5 x the sampling rate) becomes 1.
    """
    if total <= 0:
        return []
    known = math.isfinite(container_fps) and container_fps > 0
    stride = max(1, round(float(container_fps) / fps)) if known else 1
    candidates = list(range(0, total, stride))
    if len(candidates) > max_frames:
        num = max_frames
    elif len(candidates) < min_frames:
        num = min_frames
    else:
        return candidates
    return [candidates[int(k)] for k in np.linspace(0, len(candidates) - 1, num=num, dtype=int)]


def _uniform(count: int, num: int) -> list[int]:
    """`num` indices spread evenly over range(count), truncated to int as VITA's np.linspace(dtype=int)."""
    return sorted({int(x) for x in np.linspace(0, count - 1, num=num)})


@contextmanager
def _video_path(data_or_path: bytes | str | os.PathLike[str]) -> Iterator[str]:
    """A filesystem path for cv2; bytes go to a temporary file that is always removed."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        if not data_or_path:
            raise InvalidVideoError(f"video is empty (0 bytes); {_ACCEPTED}")
        # delete=False + explicit unlink: the file must be closed before cv2 opens it (Windows).
        with tempfile.NamedTemporaryFile(prefix="vita-video-", suffix=".bin", delete=False) as tmp:
            name = tmp.name
        try:
            with open(name, "wb") as fh:
                fh.write(bytes(data_or_path))
            yield name
        finally:
            os.unlink(name)
        return
    path = os.fspath(data_or_path)
    if not os.path.isfile(path):
        raise InvalidVideoError(f"video file not found: {path!r}")
    yield path


def _open(path: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise InvalidVideoError(f"could not open video; {_ACCEPTED}")
    return cap


def _count_frames(path: str) -> tuple[int, float]:
    """(frames actually decodable, container fps). Counted by grabbing: CAP_PROP_FRAME_COUNT is
    unreliable for WEBM/MKV and streamed MP4."""
    cap = _open(path)
    try:
        container_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        total = 0
        while cap.grab():
            total += 1
    finally:
        cap.release()
    return total, container_fps


def _check_frame_size(path: str, max_pixels: int) -> None:
    cap = _open(path)
    try:
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    if width * height > max_pixels:
        raise InvalidVideoError(
            f"video frames are {width}x{height}; at most {max_pixels / 1e6:.1f} megapixels per frame are accepted"
        )


def _read_frames(
    path: str, indices: Sequence[int], transform: Callable[[Image.Image], Image.Image] | None = None
) -> list[Image.Image]:
    """The frames at `indices` (ascending, repeats allowed) as RGB PIL images, each decoded once;
    an index past what actually decodes is skipped."""
    wanted = set(indices)
    last = max(indices)
    decoded: dict[int, Image.Image] = {}
    cap = _open(path)
    try:
        for index in range(last + 1):
            if not cap.grab():
                break
            if index in wanted:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    frame = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    decoded[index] = transform(frame) if transform is not None else frame
    finally:
        cap.release()
    return [decoded[i] for i in indices if i in decoded]


def select_live_frames(
    frames: Sequence[tuple[float, T]],
    now: float,
    *,
    window_s: float = 2.0,
    max_frames: int = 4,
) -> list[T]:
    """Live-stream policy: of the (timestamp, frame) pairs with now - window_s <= t <= now, keep at
    most max_frames spread uniformly over them, oldest first. Pure: `now` is stream time in seconds."""
    if window_s <= 0 or max_frames < 1:
        raise ValueError(f"need window_s > 0 and max_frames >= 1; got {window_s}, {max_frames}")
    recent = sorted(
        ((t, k) for k, (t, _) in enumerate(frames) if now - window_s <= t <= now),
        key=lambda pair: pair[0],
    )
    if len(recent) > max_frames:
        recent = [recent[k] for k in _uniform(len(recent), max_frames)]
    return [frames[k][1] for _, k in recent]


def frames_to_pixel_values(
    frames: Sequence[Image.Image | bytes | np.ndarray], image_size: int = 448
) -> np.ndarray:
    """Frames -> (N, 3, S, S) float32, one tile per frame (see `square_frame`)."""
    if not frames:
        raise InvalidVideoError("no video frames to encode; send at least one frame")
    return normalize_tiles([square_frame(f, image_size) for f in frames], image_size)


def square_frame(frame: Image.Image | bytes | np.ndarray, image_size: int = 448) -> Image.Image:
    """Resize the short side to `image_size` and centre-crop, as VITA's CLIPImageProcessor does.

    VITA's `preprocessor_config.json` has ``size: 448`` (= ``shortest_edge``), ``crop_size: 448``, bicubic.
    transformers' `get_resize_output_image_size` gives the long side ``int(size * long / short)``
    (truncated, not rounded: 640x479 -> 598x448, where round would give 599), and `center_crop` starts
    at ``(side - crop) // 2``. A square `image_size` image is exactly one tile under dynamic tiling, so
    frames can travel to the engine as ordinary images without being stretched.
    """
    image = as_image(frame)
    width, height = resized_short_side(image.width, image.height, image_size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def resized_short_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to `size`: transformers' shortest_edge arithmetic."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size
