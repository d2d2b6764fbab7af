"""``cache_latents``: encode every training image once with the VAE and reuse the result.

The cache holds the VAE's posterior (mean and standard deviation, scaled) for each image, and
for its mirror image when the image can be flipped. The step still draws a fresh latent sample
from it, so a cached run sees the same kind of noise as an uncached one, and the VAE, the image
decoding and the data-loader workers leave the step altogether. Plugins' image transforms run
once per image (and mirror) when the cache is built; caption transforms still run each time.
The cache lives in CPU memory (about 2 × 4 × (H/8) × (W/8) × 4 bytes per entry: 128 KiB at
512×512); each batch is copied to the training device as it is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from data import Batch, TrainDataset
from models.bundle import ModelBundle
from training.precision import Precision
from training.step import LatentDistribution, encode_latent_distribution

logger = logging.getLogger(__name__)

ENCODE_BATCH = 8
Key = tuple[int, bool]  # (image index, flipped)


class LatentCache:
    """Posteriors keyed by (image index, flipped): a `training.sources.BatchSource`."""

    def __init__(
        self,
        dataset: TrainDataset,
        means: dict[Key, torch.Tensor],
        stds: dict[Key, torch.Tensor],
        device: torch.device,
    ) -> None:
        self.dataset = dataset
        self.means = means
        self.stds = stds
        self.device = device

    def __len__(self) -> int:
        return len(self.means)

    def batches(
        self, epoch: int, start_batch: int, end_epoch: int, grad_accum: int
    ) -> Iterator[Batch]:
        """The batches of the run from (epoch, start_batch) on, without pixels."""
        return self.dataset.batches_without_pixels(epoch, start_batch, end_epoch, grad_accum)

    def latents(self, batch: Batch) -> LatentDistribution:
        keys = list(zip(batch.image_indices, batch.flipped, strict=True))
        non_blocking = self.device.type == "cuda"
        mean = torch.stack([self.means[k] for k in keys]).to(self.device, non_blocking=non_blocking)
        std = torch.stack([self.stds[k] for k in keys]).to(self.device, non_blocking=non_blocking)
        return LatentDistribution(mean, std)


def keys_needed(dataset: TrainDataset) -> list[Key]:
    """Every (image, flipped) pair a run can train on: each image, and its mirror where flips
    can happen."""
    keys = []
    for image in dataset.images:
        keys.append((image.index, False))
        if image.flip_p > 0:
            keys.append((image.index, True))
    return keys


def encoding_chunks(dataset: TrainDataset, keys: list[Key]) -> list[list[Key]]:
    """``keys`` grouped by bucket (in first-seen order) and cut into batches of
    `ENCODE_BATCH`: the batches the VAE encodes. The same keys give the same batches, so the
    disk cache encodes exactly what the memory cache does."""
    by_bucket: dict[tuple[int, int], list[Key]] = {}
    for key in keys:
        by_bucket.setdefault(dataset.images[key[0]].bucket, []).append(key)
    return [
        keys[start : start + ENCODE_BATCH]
        for keys in by_bucket.values()
        for start in range(0, len(keys), ENCODE_BATCH)
    ]


def encode_chunk(
    dataset: TrainDataset,
    bundle: ModelBundle,
    precision: Precision,
    device: torch.device,
    chunk: list[Key],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The posterior (mean, std) of each key of one chunk, on the CPU."""
    pixels = torch.stack([dataset.decode(i, flip) for i, flip in chunk]).to(device)
    posterior = encode_latent_distribution(bundle, pixels, precision)
    return [(posterior.mean[n].cpu(), posterior.std[n].cpu()) for n in range(len(chunk))]


def build_latent_cache(
    dataset: TrainDataset, bundle: ModelBundle, precision: Precision, device: torch.device
) -> LatentCache:
    """Encode every image (and its mirror where flips can happen) once."""
    started = time.perf_counter()
    means: dict[Key, torch.Tensor] = {}
    stds: dict[Key, torch.Tensor] = {}
    for chunk in encoding_chunks(dataset, keys_needed(dataset)):
        encoded = encode_chunk(dataset, bundle, precision, device, chunk)
        for key, (mean, std) in zip(chunk, encoded, strict=True):
            means[key], stds[key] = mean, std
    logger.info(
        "cache_latents: %d latents of %d images encoded in %.1f s",
        len(means),
        len(dataset.images),
        time.perf_counter() - started,
    )
    return LatentCache(dataset, means, stds, device)
