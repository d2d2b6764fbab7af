"""Loss masks (``masked_loss``): which pixels of each training image the loss counts.

An image's mask is its sidecar ``<image name without extension>-masklabel.png`` when there is
one (OneTrainer's convention: white trains, black does not, grey in between), else its alpha
channel, else all white. The mask is oriented, cropped and resized to the image's bucket exactly
as the image is (the same crop box, area-averaged), flipped with it, and scaled to [0, 1].
Mask sidecars are never training images (the scan leaves them out).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image, ImageOps

from data.buckets import Size, crop_box

MASK_SUFFIX = "-masklabel.png"
# Masks kept at latent size in memory, keyed by (path, bucket, flipped): small (a 512 px bucket's
# is 4 KiB) but bounded, so a huge dataset does not grow without limit.
MAX_CACHED_BYTES = 256 * 2**20


def mask_file(image: Path) -> Path:
    """The mask sidecar of ``image``: ``<stem>-masklabel.png`` beside it."""
    return image.with_name(f"{image.stem}{MASK_SUFFIX}")


def is_mask_file(name: str) -> bool:
    """Whether a file name is a mask sidecar (never a training image)."""
    return name.lower().endswith(MASK_SUFFIX)


def _oriented_mask(path: Path) -> Image.Image:
    """The mask of image ``path`` as 8-bit greyscale, the size of the oriented image."""
    with Image.open(path) as image:
        image.load()
        oriented = ImageOps.exif_transpose(image)
    sidecar = mask_file(path)
    if sidecar.is_file():
        with Image.open(sidecar) as mask:
            mask.load()
            grey = mask.convert("L")
        if grey.size != oriented.size:
            grey = grey.resize(oriented.size, Image.Resampling.BILINEAR)
        return grey
    if "A" in oriented.getbands():
        return oriented.getchannel("A")
    if "transparency" in oriented.info:
        return oriented.convert("RGBA").getchannel("A")
    return Image.new("L", oriented.size, 255)


def load_mask(path: Path, bucket: Size, flipped: bool) -> torch.Tensor:
    """The mask of image ``path`` in its bucket, float32 [height, width] in [0, 1]."""
    mask = _oriented_mask(path)
    box = crop_box(mask.size, bucket)
    fitted = mask.resize(bucket, Image.Resampling.BOX, box=box)
    if flipped:
        fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A bucket-size mask averaged down to the latents' (height, width): [1, h, w]."""
    return F.interpolate(mask[None, None], size=size, mode="area")[0]


class MaskLoader:
    """Latent-size masks of a batch's images, loaded once and kept (up to a byte budget)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, Size, bool, tuple[int, int]], torch.Tensor] = {}
        self._bytes = 0

    def masks(
        self,
        paths: Sequence[str],
        bucket: Size,
        flipped: Sequence[bool],
        size: tuple[int, int],
    ) -> torch.Tensor:
        """[batch, 1, h, w] float32 masks of the images, at latent size ``size``."""
        return torch.stack(
            [self._one(path, bucket, flip, size) for path, flip in zip(paths, flipped, strict=True)]
        )

    def _one(self, path: str, bucket: Size, flipped: bool, size: tuple[int, int]) -> torch.Tensor:
        key = (path, bucket, flipped, size)
        found = self._cache.get(key)
        if found is None:
            found = latent_mask(load_mask(Path(path), bucket, flipped), size)
            if self._bytes + found.nbytes <= MAX_CACHED_BYTES:
                self._cache[key] = found
                self._bytes += found.nbytes
        return found
