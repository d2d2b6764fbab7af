"""`Batch`: one micro-batch of this process, as the loader or the latent cache hands it over."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from data.buckets import Size
from data.plan import BatchPlan, PlanItem
from data.transforms import DataTransforms, trained_caption


@dataclass(frozen=True)
class Batch:
    """The images of one batch and what was decided about them.

    ``index`` is the batch's index in its ``epoch`` (for this process). The per-image lists run
    in the same order as the rows of ``pixel_values``, which is None when the pixels are not
    loaded (a latent cache supplies the latents instead). ``image_indices`` index
    `TrainDataset.images`; with ``flipped`` they identify the pixels exactly. ``captions`` are
    what the text encoder gets: caption transforms applied, "" where conditional dropout
    dropped the caption. ``original_sizes`` (width, height) and ``crops`` (left, top) are each
    image's size before resizing and what its crop cut off: SDXL's size conditioning.
    """

    epoch: int
    index: int
    bucket: Size
    paths: tuple[str, ...]
    captions: tuple[str, ...]
    flipped: tuple[bool, ...]
    image_indices: tuple[int, ...]
    loss_scales: tuple[float, ...]
    original_sizes: tuple[Size, ...]
    crops: tuple[Size, ...]
    pixel_values: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        epoch: int,
        plan: BatchPlan,
        items: tuple[PlanItem, ...] | None = None,
        pixel_values: torch.Tensor | None = None,
        transforms: DataTransforms | None = None,
    ) -> Batch:
        """The batch of ``plan`` in ``epoch``; ``items`` replace the plan's (substitutes).
        Captions get the caption transform of ``transforms``, then dropout."""
        items = plan.items if items is None else items
        return cls(
            epoch=epoch,
            index=plan.index,
            bucket=plan.bucket,
            paths=tuple(item.path for item in items),
            captions=tuple(trained_caption(item, transforms) for item in items),
            flipped=tuple(item.flipped for item in items),
            image_indices=tuple(item.image_index for item in items),
            loss_scales=tuple(item.loss_scale for item in items),
            original_sizes=tuple(item.original_size for item in items),
            crops=tuple(item.crop for item in items),
            pixel_values=pixel_values,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self) -> Batch:
        """A copy with pinned pixels (the DataLoader calls this with ``pin_memory=True``)."""
        if self.pixel_values is None:
            return self
        return dataclasses.replace(self, pixel_values=self.pixel_values.pin_memory())
