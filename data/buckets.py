"""Aspect-ratio buckets: the training sizes for one `resolution`, and which one an image gets."""

from __future__ import annotations

import math

# Widest and tallest bucket: 4:1 and 1:4.
MAX_BUCKET_ASPECT = 4.0
# Side step at and above this resolution; below it the step is SMALL_RESOLUTION_STEP so that the
# tiny test resolutions (64, 128, 192) still get non-square buckets.
FULL_STEP_FROM_RESOLUTION = 256
FULL_STEP = 64
SMALL_RESOLUTION_STEP = 16

Size = tuple[int, int]  # (width, height) in pixels


def bucket_step(resolution: int) -> int:
    """The multiple that every bucket side is made of, for this resolution."""
    return FULL_STEP if resolution >= FULL_STEP_FROM_RESOLUTION else SMALL_RESOLUTION_STEP


def make_buckets(resolution: int) -> list[Size]:
    """All bucket sizes for `resolution` R, sorted by aspect (tallest first).

    Every bucket has sides that are multiples of `bucket_step(R)`, an area of at most R×R (and at
    least 75% of it; 80-95% from R=320 on), and an aspect between 1:4 and 4:1. For each possible
    short side the longest fitting long side is taken, and for each possible long side the longest
    fitting short side; both orientations of each pair are included.
    """
    step = bucket_step(resolution)
    area = resolution * resolution
    pairs: set[Size] = set()
    for short in range(step, resolution + step, step):
        long = area // short // step * step
        if long >= short:
            pairs.add((short, long))
    for long in range(resolution, int(resolution * MAX_BUCKET_ASPECT) + step, step):
        short = area // long // step * step
        if short >= step:
            pairs.add((short, long))
    buckets: set[Size] = set()
    for short, long in pairs:
        if long / short <= MAX_BUCKET_ASPECT:
            buckets.add((short, long))
            buckets.add((long, short))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def crop_offset(size: Size, bucket: Size, flipped: bool) -> Size:
    """``(left, top)``: the pixels the bucket's crop cuts off on the left and at the top of the
    image scaled to cover the bucket (after the flip, when flipped), rounded. SDXL's crop
    conditioning is this pair (as ``top, left``)."""
    left, top, right, _ = crop_box(size, bucket)
    scale = bucket[0] / (right - left)
    cut_left = size[0] - right if flipped else left
    return round(cut_left * scale), round(top * scale)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect is nearest to the image's (compared on a log scale, so 2:1 and 1:2
    are equally far from 1:1); on a tie the larger bucket."""
    log_aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_aspect), -b[0] * b[1]))


def bucket_name(bucket: Size) -> str:
    """`"512x512"`: width x height, the form used in the dry run and the schedule file."""
    return f"{bucket[0]}x{bucket[1]}"


def crop_box(size: Size, bucket: Size) -> tuple[float, float, float, float]:
    """The centred region of an image of `size` with the bucket's aspect: what is kept when the
    image is resized to cover the bucket and the overhang is cropped."""
    width, height = size
    target = bucket[0] / bucket[1]
    if width / height > target:
        kept = height * target
        left = (width - kept) / 2
        return (left, 0.0, left + kept, float(height))
    kept = width / target
    top = (height - kept) / 2
    return (0.0, top, float(width), top + kept)
