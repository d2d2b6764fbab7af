"""Hook points for data transforms (EveryDream2 plugins' `transform_caption` and
`transform_pil_image`), applied each time an image is used, in EveryDream2's order:

- image: load → crop/resize to the bucket → flip → `image()` → tensor;
- caption: tag shuffle (in the plan) → `caption()` → conditional dropout (an empty caption).

They run wherever the data is loaded: in the loader's worker processes (the transforms object is
pickled into them) or in the training process. With `cache_latents`, image transforms run once
per image and flip, when the cache is built (`TrainDataset.decode`). Transforms are not part of
the deterministic plan: the schedule file shows captions before them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from PIL import Image

from data.buckets import Size
from data.errors import DataTransformError, is_valid_text

if TYPE_CHECKING:
    from data.plan import PlanItem


@runtime_checkable
class DataTransforms(Protocol):
    """What a set of data transforms offers. It must be picklable (worker processes get a copy).
    A transform that does nothing returns its argument."""

    def caption(self, caption: str) -> str:
        """The caption to train on, from the caption as planned (after tag shuffling)."""
        ...

    def image(self, image: Image.Image) -> Image.Image:
        """The image to train on, from the cropped, resized and flipped RGB image."""
        ...


def transform_caption(transforms: DataTransforms | None, caption: str) -> str:
    """`caption` after the caption transform; DataTransformError when the result is not text
    the tokenizer can take."""
    if transforms is None:
        return caption
    result = transforms.caption(caption)
    if not isinstance(result, str) or not is_valid_text(result):
        raise DataTransformError(
            f"data transform: caption() must return text (valid Unicode), got {result!r:.80} "
            f"for {caption!r:.80}"
        )
    return result


def trained_caption(item: PlanItem, transforms: DataTransforms | None) -> str:
    """The caption an image is trained with: the caption transform applied (also to a dropped
    caption, as EveryDream2 does), then "" when conditional dropout dropped it."""
    caption = transform_caption(transforms, item.caption)
    return "" if item.dropped else caption


def transform_image(
    transforms: DataTransforms | None, image: Image.Image, bucket: Size
) -> Image.Image:
    """`image` after the image transform; it must stay an image of the bucket's size (its mode
    is converted to RGB)."""
    if transforms is None:
        return image
    result = transforms.image(image)
    if not isinstance(result, Image.Image) or result.size != tuple(bucket):
        got = type(result).__name__
        if isinstance(result, Image.Image):
            got = f"{result.size[0]}x{result.size[1]} image"
        raise DataTransformError(
            f"data transform: image() must return a {bucket[0]}x{bucket[1]} PIL image (the "
            f"size it was given), got a {got}"
        )
    return result if result.mode == "RGB" else result.convert("RGB")
