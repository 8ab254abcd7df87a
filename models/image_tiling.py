"""Image preprocessing for VITA's InternViT tower: InternVL dynamic tiling + ImageNet normalisation.

An image is resized (bicubic, no padding) to the (i, j) grid of 448 px tiles whose aspect ratio
is closest to the image's, with i*j in [min_num, max_num]; a 448x448 thumbnail of the whole image
is appended when there is more than one tile. Each tile becomes 256 LLM tokens.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.errors import InvalidImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ACCEPTED = "images must be JPEG, PNG, WEBP, GIF or BMP"


MAX_PIXELS = 16_000_000  # far above what tiling uses (at most 12 tiles of 448²)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image (GIF: first frame), at most `max_pixels` pixels."""
    if not data:
        raise InvalidImageError(f"image is empty (0 bytes); {_ACCEPTED}")
    try:
        image = Image.open(io.BytesIO(bytes(data)), formats=list(ACCEPTED_FORMATS))
        # Refuse decompression bombs from the header, before decoding: a few kB can expand to GBs.
        if image.width * image.height > max_pixels:
            raise InvalidImageError(
                f"image is {image.width}x{image.height}; at most {max_pixels / 1e6:.1f} megapixels are accepted"
            )
        image.load()  # force the full decode here so truncated data fails now, not later
    except InvalidImageError:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"unrecognised or unsupported image format; {_ACCEPTED}") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"image has too many pixels to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"image data is corrupt or truncated ({exc}); {_ACCEPTED}") from exc
    return ensure_rgb(image)


def ensure_rgb(image: Image.Image) -> Image.Image:
    """RGB version of `image`; rejects zero-size images.

    Uses a plain convert('RGB') (alpha dropped, not composited) because that is what InternVL
    and VITA did in training.
    """
    if image.width <= 0 or image.height <= 0:
        raise InvalidImageError(
            f"image has zero size ({image.width}x{image.height}); it needs at least 1x1 pixel"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def as_image(obj: Image.Image | bytes | bytearray | memoryview | np.ndarray) -> Image.Image:
    """Accept a PIL image, encoded image bytes, or an HxWx3 uint8 RGB array; return an RGB PIL image."""
    if isinstance(obj, Image.Image):
        return ensure_rgb(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return decode_image(bytes(obj))
    if isinstance(obj, np.ndarray):
        if obj.ndim != 3 or obj.shape[2] != 3 or obj.dtype != np.uint8:
            raise InvalidImageError(
                f"image arrays must be HxWx3 uint8 RGB; got shape {obj.shape} dtype {obj.dtype}"
            )
        if obj.shape[0] == 0 or obj.shape[1] == 0:
            raise InvalidImageError(
                f"image has zero size ({obj.shape[1]}x{obj.shape[0]}); it needs at least 1x1"
            )
        return Image.fromarray(np.ascontiguousarray(obj))  # HxWx3 uint8 is inferred as RGB
    raise InvalidImageError(
        f"unsupported image object {type(obj).__name__}; pass a PIL image, encoded bytes "
        f"(JPEG/PNG/WEBP/GIF/BMP) or an HxWx3 uint8 array"
    )


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All grids (i, j) with min_num <= i*j <= max_num, ordered as InternVL orders them.

    InternVL builds a set and stable-sorts it by i*j, so grids with equal area keep the set's
    iteration order; that order decides ties in `closest_aspect_ratio`, so we reproduce it.
    """
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num; got min_num={min_num}, max_num={max_num}")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda r: r[0] * r[1])


def closest_aspect_ratio(
    aspect: float,
    ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """InternVL rule: the grid with the smallest |aspect - i/j|; on an exact tie a later (larger) grid
    wins only if the image has more than half the pixels that grid would hold."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for i, j in ratios:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def _grid_for(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The (columns, rows) tile grid InternVL picks for a width x height image."""
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"image has zero size ({width}x{height}); it needs at least 1x1 pixel")
    return closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)


def dynamic_tiles(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Resize to the chosen grid (bicubic) and cut row-major tiles; add a thumbnail if > 1 tile."""
    image = ensure_rgb(image)
    cols, rows = _grid_for(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(tiles: Sequence[Image.Image], image_size: int = 448) -> np.ndarray:
    """Tiles -> (N, 3, S, S) float32: pixels / 255, then ImageNet mean/std per channel."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 1, 3)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 1, 3)
    out = np.empty((len(tiles), 3, image_size, image_size), dtype=np.float32)
    for k, tile in enumerate(tiles):
        tile = ensure_rgb(tile)
        if tile.size != (image_size, image_size):
            raise ValueError(f"tile {k} is {tile.width}x{tile.height}; expected {image_size}x{image_size}")
        pixels = np.asarray(tile, dtype=np.float32) / np.float32(255.0)
        out[k] = ((pixels - mean) / std).transpose(2, 0, 1)
    return out


def image_to_pixel_values(
    image: Image.Image | bytes | np.ndarray,
    *,
    max_dynamic_patch: int,
    min_dynamic_patch: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> np.ndarray:
    """Any accepted image -> (tiles, 3, S, S) float32 pixel values for the vision tower."""
    tiles = dynamic_tiles(as_image(image), min_dynamic_patch, max_dynamic_patch, image_size, use_thumbnail)
    return normalize_tiles(tiles, image_size)


def num_tiles_for(
    width: int,
    height: int,
    *,
    max_dynamic_patch: int = 12,
    min_dynamic_patch: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> int:
    """Tiles (thumbnail included) `dynamic_tiles` would return, computed without touching pixels."""
    cols, rows = _grid_for(width, height, min_dynamic_patch, max_dynamic_patch, image_size)
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks > 1 else blocks


def tokens_per_tile(image_size: int = 448, patch_size: int = 14, downsample_ratio: float = 0.5) -> int:
    """LLM tokens per tile: (image_size / patch)^2 patches, pixel-shuffled by downsample_ratio^2 (256)."""
    side = image_size // patch_size
    return round(side * side * downsample_ratio * downsample_ratio)
