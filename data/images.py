"""Image files: checking them once at scan time, and decoding them to bucket-sized tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data.buckets import Size, crop_box
from data.transforms import DataTransforms, transform_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jfif"})
# Images with a side below this are skipped: there is nothing to learn from them.
MIN_SIDE = 8
# Images longer than this aspect (long side / short side) are skipped: the widest bucket is 4:1,
# so more than half of such an image would be cropped away.
MAX_ASPECT = 8.0
# Resizing: Lanczos after an integer box reduction down to 3× the target (fast, and as sharp as a
# plain Lanczos resize to the eye). JPEGs are first decoded at 1/2, 1/4 or 1/8 scale when that
# still covers the bucket.
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class UnusableImageError(Exception):
    """An image file that cannot be trained on; the message is the reason (no path)."""


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(_EXIF_ORIENTATION)
    return value if isinstance(value, int) else 1


def probe_image(path: Path) -> Size:
    """Check that `path` is an image this trainer can use and return its (width, height) after
    EXIF orientation. The whole file is decoded once (JPEGs at 1/8 scale, which still reads every
    byte), so truncated and corrupt files are found here rather than in a loader worker.

    Raises UnusableImageError with the reason.
    """
    if path.stat().st_size == 0:
        raise UnusableImageError("empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                raise UnusableImageError(
                    f"too small: {width}x{height} px (each side needs at least {MIN_SIDE} px)"
                )
            if max(width, height) / min(width, height) > MAX_ASPECT:
                raise UnusableImageError(
                    f"aspect too extreme: {width}x{height} px is beyond {MAX_ASPECT:g}:1 "
                    f"(buckets reach 4:1; most of the image would be cropped away)"
                )
            image.draft(None, (1, 1))
            image.load()
            orientation = _orientation(image)
    except UnusableImageError:
        raise
    except UnidentifiedImageError:
        raise UnusableImageError("not an image file that Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise UnusableImageError(f"too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnusableImageError(f"cannot be decoded: {error}") from None
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit greyscale scaled (not clipped) to 8 bits, transparency
    composited on white, palette/CMYK/greyscale converted."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, cover: Size | None = None) -> Image.Image:
    """The image at `path`, EXIF orientation applied, as 8-bit RGB.

    With `cover` (a bucket size) a JPEG is decoded at the smallest 1/2^k scale that still covers
    it, which makes large JPEGs several times faster to load.
    """
    with Image.open(path) as image:
        if cover is not None:
            orientation = _orientation(image)
            width, height = image.size
            if orientation in _SWAPPING_ORIENTATIONS:
                cover = (cover[1], cover[0])
            factor = max(cover[0] / width, cover[1] / height)
            image.draft(None, (math.ceil(width * factor), math.ceil(height * factor)))
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return to_rgb(oriented)


def fit_to_bucket(image: Image.Image, bucket: Size) -> Image.Image:
    """Resize to cover the bucket and crop the centre to exactly the bucket's size."""
    box = crop_box(image.size, bucket)
    return image.resize(bucket, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Float tensor [3, H, W] in [-1, 1]."""
    # NumPy, not torch: this runs per image, and torch's intra-op threads cost more than they
    # save on arrays this small (tens of ms per call measured on a 2-core VM, vs about 1 ms).
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    pixels /= 127.5
    pixels -= 1.0
    return torch.from_numpy(pixels)


def load_fitted(path: Path, bucket: Size) -> Image.Image:
    """The file's pixels cropped and resized to the bucket: load, orient, RGB, cover-resize,
    crop. Raises what Pillow raises for a file that cannot be read or decoded."""
    return fit_to_bucket(load_rgb(path, cover=bucket), bucket)


def finish_image(
    image: Image.Image, bucket: Size, flipped: bool, transforms: DataTransforms | None = None
) -> torch.Tensor:
    """The rest of an image's way, in EveryDream2's order: flip, image transform, tensor."""
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(transform_image(transforms, image, bucket))


def decode_image(
    path: Path, bucket: Size, flipped: bool, transforms: DataTransforms | None = None
) -> torch.Tensor:
    """Everything a training image goes through: load, orient, RGB, cover-resize, crop, flip,
    image transform (when `transforms` are given), tensor."""
    return finish_image(load_fitted(path, bucket), bucket, flipped, transforms)
