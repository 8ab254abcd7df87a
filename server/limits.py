"""Every bound the server puts on what a client sends, in one place, each with its reason.

The rule: a decoder checks the size an input *declares* (samples and rate, pixels, characters) against these
before it allocates the expanded form, and refuses with an error that names the limit. A 16 KB WAV that
declares 1 Hz would otherwise be upsampled 16 000-fold before a length check saw it; a 50 KB PNG can
declare 16 000 x 16 000 pixels. The checks here are pure (no I/O) so they are tested on their own.

Settings that an operator may want to change (`max_buffered_audio_s`, `max_event_bytes`,
`session_memory_mib`, `blocking_threads`) are in server/settings.py; what is fixed by the model or by
the protocol is here.
"""

from __future__ import annotations

import math

from models.image_tiling import MAX_PIXELS, closest_aspect_ratio, target_ratios
from models.resample import LOWPASS_FILTER_WIDTH, ROLLOFF

# --- text ----------------------------------------------------------------------------------------

# Instructions go into every prompt: tokenized each turn and held in the KV cache. 32k characters is far
# past any real system prompt and still bounds what one client can make every turn cost.
MAX_INSTRUCTIONS_CHARS = 32_768

# Typed text of one turn (a realtime item, vita.text.append, a chat request's messages together).
# VITA's longest context is 32k tokens; no tokenizer fits 256 Ki characters into that, so anything longer
# could only fail at the engine after a tokenization that costs seconds and tens of MB.
MAX_INPUT_TEXT_CHARS = 262_144

# A voice is a name ("alloy", "vita"). It is echoed in every session.updated: a 1 MB name would be too.
MAX_VOICE_CHARS = 64

# Prompts with more characters than this are tokenized in the blocking executor, not on the event loop
# (8 Ki characters tokenize in ~5 ms; a 256 Ki prompt in ~0.2 s, which would stall every session).
OFFLOAD_TEXT_CHARS = 8_192

# --- audio ---------------------------------------------------------------------------------------

MODEL_RATE_HZ = 16_000  # what VITA's audio encoder hears; every clip is resampled to it

# Declared sample rates outside this range are refused before decoding: below 8 kHz (telephony) there is
# no speech band left to hear, and above 192 kHz (studio masters) nothing is gained but samples to decode.
MIN_AUDIO_RATE_HZ = 8_000
MAX_AUDIO_RATE_HZ = 192_000

# Channels are decoded one block at a time and only the first is kept (as VITA does), so this bounds a
# block's size, not the clip's: 64 covers every real multichannel layout.
MAX_AUDIO_CHANNELS = 64

# The sinc filter from a rate to 16 kHz has (taps x phases) weights, from the two rates divided by their
# gcd: 44.1 kHz needs 76 k, 11.025 kHz 291 k; a rate sharing no factor with 16000 (7919 Hz) needs 127 M
# (half a GB, cached). Rates whose filter is larger than this are refused, naming the rates that work; at
# this bound a filter is 2.4 MB (weights and matrix) and models.resample caches at most 16 of them.
MAX_RESAMPLE_WEIGHTS = 300_000

# Realtime appends with more base64 than this (1 s of 24 kHz PCM16: 48 000 bytes) are decoded, resampled and
# scored by the VAD in the blocking executor; a client's usual 20-100 ms chunks are cheaper done in place.
OFFLOAD_AUDIO_CHARS = 64_000

# Realtime events and chat bodies larger than this are parsed (JSON, validation) in the blocking executor: a
# 15 MiB event takes ~0.1 s to parse. Data URLs and base64 of any size are decoded there too.
OFFLOAD_EVENT_BYTES = 1 << 20

# --- images --------------------------------------------------------------------------------------

# An uploaded image or camera frame, checked from its header before decoding: 16 MP is a phone camera's full
# sensor (48 MB as RGB while it is decoded, in the blocking executor). What is kept is at model resolution: a
# frame as its one 448x448 tile, an image as the tile grid dynamic tiling cuts (at most 12 tiles).
MAX_IMAGE_PIXELS = MAX_PIXELS
MAX_FRAME_PIXELS = MAX_PIXELS

# --- sessions ------------------------------------------------------------------------------------

# Ids of a session's recent items, responses and speech segments kept (for truncate and retrieve): a
# session of thousands of turns forgets the oldest instead of growing.
MAX_TRACKED_IDS = 64


# --- checks ----------------------------------------------------------------------------------------


def resample_weights(rate: int, target: int = MODEL_RATE_HZ) -> int:
    """Weights of the sinc filter `models.resample` builds for rate -> target (0 when they are equal)."""
    if rate == target:
        return 0
    gcd = math.gcd(rate, target)
    orig, new = rate // gcd, target // gcd
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))
    return (2 * width + orig) * new


def audio_rate_problem(rate: object) -> str | None:
    """Why a declared sample rate is refused, or None when it is accepted."""
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        return f"audio sample rate must be a positive whole number of Hz; got {rate!r}"
    if not MIN_AUDIO_RATE_HZ <= rate <= MAX_AUDIO_RATE_HZ:
        return (f"audio sample rate is {rate} Hz; accepted: {MIN_AUDIO_RATE_HZ} to {MAX_AUDIO_RATE_HZ} Hz "
                "(speech is heard at 16000 Hz)")
    if resample_weights(rate) > MAX_RESAMPLE_WEIGHTS:
        return (f"audio sample rate {rate} Hz shares too small a factor with 16000 Hz to resample cheaply; "
                "use a common rate (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000 or 96000 Hz)")
    return None


def audio_duration_problem(samples: int, rate: int, max_seconds: float, what: str = "audio") -> str | None:
    """Why `samples` at `rate` (as declared, before decoding) is too long, or None."""
    if samples > max_seconds * rate:
        return f"{what} is {samples / rate:.1f} s long; at most {max_seconds:g} s is accepted"
    return None


def model_samples(samples: int, rate: int) -> int:
    """How many 16 kHz samples `samples` at `rate` become (resampling rounds up, as torchaudio does)."""
    return samples if rate == MODEL_RATE_HZ else math.ceil(samples * MODEL_RATE_HZ / rate)


def pixels_problem(width: int, height: int, max_pixels: int, what: str = "image") -> str | None:
    """Why an image of this declared size is refused, or None."""
    if width <= 0 or height <= 0:
        return f"{what} has zero size ({width}x{height}); it needs at least 1x1 pixel"
    if width * height > max_pixels:
        return (f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels); at most "
                f"{max_pixels / 1e6:.1f} megapixels are accepted")
    return None


def tile_grid_size(width: int, height: int, *, image_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (width, height) InternVL's dynamic tiling resizes this image to: what the model sees of it
    (plus a thumbnail). An image larger than this may be stored at this size without changing its tiles."""
    cols, rows = closest_aspect_ratio(width / height, target_ratios(min_tiles, max_tiles), width, height,
                                      image_size)
    return cols * image_size, rows * image_size


def text_problem(chars: int, what: str, limit: int = MAX_INPUT_TEXT_CHARS) -> str | None:
    if chars > limit:
        return f"{what} is {chars} characters; at most {limit} are accepted"
    return None
