"""SDXL's micro-conditioning: the six time ids of each image and the UNet's added conditions.

SDXL's UNet is conditioned, besides the text, on three pairs of numbers per image (SDXL paper,
§2.2; diffusers' ``StableDiffusionXLPipeline._get_add_time_ids`` orders them the same way):

1. the original size ``(height, width)`` of the image, before any resizing;
2. the crop's top-left corner ``(top, left)``: how many pixels the crop cut off at the top and on
   the left, in the resized image's pixels (the image is scaled to cover the bucket, then
   cropped to it);
3. the target size ``(height, width)``: the bucket's size, the image the model sees.

Each is embedded sinusoidally (``addition_time_embed_dim`` channels per number) and, with the
second text encoder's pooled embedding, added to the timestep embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Size = tuple[int, int]
"""``(height, width)`` or ``(top, left)`` in pixels."""


def add_time_ids(
    original_sizes: Sequence[Size],
    crops_top_left: Sequence[Size],
    target_sizes: Sequence[Size],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[B, 6]``: original height, width; crop top, left; target height, width; per image."""
    count = len(original_sizes)
    if not len(crops_top_left) == len(target_sizes) == count:
        raise ValueError(
            f"add_time_ids: {count} original sizes, {len(crops_top_left)} crops and "
            f"{len(target_sizes)} target sizes; one of each per image"
        )
    rows = [
        (*original, *crop, *target)
        for original, crop, target in zip(original_sizes, crops_top_left, target_sizes, strict=True)
    ]
    if any(len(row) != 6 for row in rows):
        raise ValueError(f"add_time_ids: every size and crop is a pair of numbers, got {rows}")
    return torch.tensor(rows, dtype=dtype, device=device).reshape(count, 6)


def added_cond_kwargs(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's ``added_cond_kwargs`` for SDXL: the pooled text embedding and the time ids.

    Call the UNet as ``unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=...)``; the time
    ids are cast to the pooled embedding's dtype and device.
    """
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
