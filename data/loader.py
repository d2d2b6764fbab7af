"""Turning an epoch plan into tensors, in DataLoader worker processes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from data.batch import Batch
from data.buckets import Size
from data.dataset import TrainDataset
from data.images import decode_image
from data.plan import BatchPlan, PlanItem

logger = logging.getLogger(__name__)

# Batches each worker decodes ahead of the training loop.
PREFETCH_BATCHES_PER_WORKER = 2
# Decoding in the training process (no workers), decoded images are kept up to this many bytes,
# so that later epochs decode nothing: the CPU such runs share is the training step's.
IN_PROCESS_MEMO_BYTES = 1 << 30


def _unchanged(batch: Batch) -> Batch:
    """collate_fn: a batch is assembled by the worker already."""
    return batch


class BatchDecoder(TorchDataset):
    """Item i = the i-th batch from (start_epoch, start_batch) on, decoded: what each
    DataLoader worker runs. One loader spans every remaining epoch, so worker processes start
    once per run, not once per epoch; each worker computes an epoch's plan when it first needs
    it (plans are pure functions of the epoch).

    Files were fully decoded once at scan time, so a failure here means the file changed or
    vanished since. The worker then logs a warning and uses the next image of the same batch
    that still decodes (then the other images of the bucket, with their plain caption, not
    flipped); the batch reports the paths it really holds. Only a bucket whose every file has
    become unreadable raises an error.
    """

    def __init__(
        self, dataset: TrainDataset, start_epoch: int, start_batch: int, end_epoch: int
    ) -> None:
        self.dataset = dataset
        self.per_epoch = dataset.steps_per_epoch()
        self.first = start_epoch * self.per_epoch + start_batch
        self.length = max(0, end_epoch * self.per_epoch - self.first)
        self.bucket_members = _bucket_members(dataset)
        self._plans: tuple[int, list[BatchPlan]] | None = None
        self._memo: dict[tuple[int, bool], torch.Tensor] | None = (
            {} if dataset.num_workers == 0 else None
        )
        self._memo_bytes = 0

    def __len__(self) -> int:
        return self.length

    def plan(self, index: int) -> tuple[int, BatchPlan]:
        """(epoch, plan) of item ``index``."""
        epoch, batch = divmod(self.first + index, self.per_epoch)
        if self._plans is None or self._plans[0] != epoch:
            self._plans = (epoch, self.dataset.epoch_batches(epoch))
        return epoch, self._plans[1][batch]

    def _decode(self, item: PlanItem, bucket: Size) -> torch.Tensor:
        """One image's pixels, from the in-process memo when it holds them."""
        key = (item.image_index, item.flipped)
        if self._memo is not None and key in self._memo:
            return self._memo[key]
        pixels = decode_image(Path(item.path), bucket, item.flipped)
        size = pixels.numel() * pixels.element_size()
        if self._memo is not None and self._memo_bytes + size <= IN_PROCESS_MEMO_BYTES:
            self._memo[key] = pixels
            self._memo_bytes += size
        return pixels

    def _decode_or_substitute(
        self, plan: BatchPlan, position: int
    ) -> tuple[PlanItem, torch.Tensor]:
        items = plan.items
        candidates = [items[(position + k) % len(items)] for k in range(len(items))]
        candidates += self.bucket_members[plan.bucket]
        for number, item in enumerate(candidates):
            try:
                pixels = self._decode(item, plan.bucket)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                logger.warning(
                    "cannot decode %s (%s); using another image instead", item.path, error
                )
                continue
            if number > 0:
                logger.warning(
                    "batch %d: %s replaced by %s", plan.step, items[position].path, item.path
                )
            return item, pixels
        raise RuntimeError(
            f"no image of bucket {plan.bucket[0]}x{plan.bucket[1]} can be decoded any more; "
            f"were files under data_root deleted or changed during training?"
        )

    def __getitem__(self, index: int) -> Batch:
        epoch, plan = self.plan(index)
        decoded = [self._decode_or_substitute(plan, k) for k in range(len(plan.items))]
        # np.stack: one copy without torch's intra-op thread pool (see images.to_tensor)
        pixels = torch.from_numpy(np.stack([pixels.numpy() for _, pixels in decoded]))
        return Batch.of(epoch, plan, tuple(item for item, _ in decoded), pixels)


def _bucket_members(dataset: TrainDataset) -> dict[Size, list[PlanItem]]:
    return {
        bucket: [
            PlanItem(i, str(dataset.images[i].path), dataset.images[i].caption, False)
            for i in indices
        ]
        for bucket, indices in dataset.buckets.items()
    }


def make_loader(
    dataset: TrainDataset,
    epoch: int,
    start_batch: int = 0,
    pin_memory: bool = False,
    end_epoch: int | None = None,
) -> DataLoader:
    """The batches from batch `start_batch` of `epoch` to the end of epoch `end_epoch` - 1
    (default: the end of `epoch`), for this process. The skipped batches are neither decoded
    nor read: exact resume mid-epoch.

    Each batch is a `Batch` whose ``pixel_values`` are float [B, 3, H, W] in [-1, 1]. Batches
    are decoded in `dataset.num_workers` worker processes (0: in this process, keeping decoded
    images in memory up to IN_PROCESS_MEMO_BYTES), started once for the whole span;
    `pin_memory=True` (on CUDA) pins them for fast, asynchronous copies.
    """
    end = epoch + 1 if end_epoch is None else end_epoch
    workers = dataset.num_workers
    return DataLoader(
        BatchDecoder(dataset, epoch, start_batch, end),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_unchanged,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_BATCHES_PER_WORKER if workers > 0 else None,
    )
