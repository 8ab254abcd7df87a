"""Turn user media (bytes or arrays) into one engine input: decode, validate, pick the system prompt.

Video becomes its sampled frames, each a square one-tile image; images keep dynamic tiling; audio becomes
a 16 kHz mono clip. The turn is laid out as upstream VITA does (`models.prompts`): `<image>` × images or
frames, "\n", the text, then `<audio>` × clips; media go to the engine in that order. Bad media raise
`InvalidMediaError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .audio_features import decode_audio, to_mono_16k
from .engine import EngineInput
from .image_tiling import as_image
from .prompts import Modality, PromptBuilder, Turn
from .video_frames import decode_video_frames, square_frame


def user_input(
    builder: PromptBuilder,
    *,
    text: str | None = None,
    images: Sequence[Image.Image | bytes] = (),
    audios: Sequence[np.ndarray | bytes] = (),
    video_frames: Sequence[Image.Image] = (),
    history: Sequence[Turn] = (),
    system: str | None = None,
) -> EngineInput:
    """The prompt for one user turn after `history`. Video frames and images do not mix in one turn."""
    if video_frames and images:
        raise ValueError("send either video frames or images in one turn, not both")
    clips = [to_mono_16k(*decode_audio(a)) if isinstance(a, (bytes, bytearray)) else a for a in audios]
    pictures = [as_image(i) for i in images]
    size = builder.config.vision_config.image_size
    frames = [square_frame(f, size) for f in video_frames]
    modality: Modality = "video" if frames else "image" if pictures else "audio" if clips else "text"
    if modality == "text" and not (text and text.strip()):
        raise ValueError("a user turn needs text, an image, audio or video")
    turn = Turn("user", text=text or "", images=len(frames) + len(pictures), audios=len(clips))
    ids = builder.build([*history, turn], modality=modality, system=system)
    return EngineInput(
        token_ids=ids,
        images=frames or pictures,
        audios=[np.asarray(c, dtype=np.float32) for c in clips],
        max_dynamic_patch=1 if frames else None,
    )


def video_file_frames(data: bytes) -> list[Image.Image]:
    """Frames of a video file as VITA's offline demo samples them (`_get_rawvideo_dec`): one every
    round(container fps) frames, then 16 spread evenly for clips over 16 s, or 4 with repeats under 4 s."""
    return decode_video_frames(data, fps=1.0, min_frames=4, max_frames=16)
