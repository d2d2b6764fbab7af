"""Where a step's batches and latents come from: images decoded by the loader, or a latent cache.

A `BatchSource` gives every remaining batch of the run from one position on, and the VAE
posterior of each batch's images. `PixelSource` decodes images in the data loader and runs the
frozen VAE in the step; `training.latent_cache.LatentCache` encodes every image once before
training and hands out batches without pixels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from data import Batch, TrainDataset, make_loader
from data.masks import MaskLoader
from models.bundle import ModelBundle
from training.precision import Precision
from training.step import LatentDistribution, encode_latent_distribution, with_masks


class BatchSource(Protocol):
    """Batches from a position to the end of the run, and their latents."""

    def batches(
        self, epoch: int, start_batch: int, end_epoch: int, grad_accum: int
    ) -> Iterable[Batch]:
        """Every batch from batch ``start_batch`` of ``epoch`` to the end of ``end_epoch - 1``,
        planned with accumulation windows of ``grad_accum`` batches."""
        ...

    def latents(self, batch: Batch) -> LatentDistribution:
        """The VAE posterior of the batch's images, on the training device."""
        ...


class PixelSource:
    """Images decoded by the data loader (worker processes on GPUs); the VAE runs in the step."""

    def __init__(
        self, dataset: TrainDataset, bundle: ModelBundle, precision: Precision, device: torch.device
    ) -> None:
        self.dataset = dataset
        self.bundle = bundle
        self.precision = precision
        self.device = device

    def batches(
        self, epoch: int, start_batch: int, end_epoch: int, grad_accum: int
    ) -> Iterable[Batch]:
        pin = self.device.type == "cuda"
        return make_loader(
            self.dataset,
            epoch,
            start_batch,
            pin_memory=pin,
            end_epoch=end_epoch,
            grad_accum=grad_accum,
        )

    def latents(self, batch: Batch) -> LatentDistribution:
        assert batch.pixel_values is not None, "the loader always decodes pixels"
        pixels = batch.pixel_values.to(self.device, non_blocking=True)
        return encode_latent_distribution(self.bundle, pixels, self.precision)


class MaskedSource:
    """Another source's batches and latents, with each image's loss mask (``masked_loss``)."""

    def __init__(self, inner: BatchSource) -> None:
        self.inner = inner
        self.loader = MaskLoader()

    def batches(
        self, epoch: int, start_batch: int, end_epoch: int, grad_accum: int
    ) -> Iterable[Batch]:
        return self.inner.batches(epoch, start_batch, end_epoch, grad_accum)

    def latents(self, batch: Batch) -> LatentDistribution:
        return with_masks(self.inner.latents(batch), batch, self.loader)
