"""Turning an epoch plan into tensors, in DataLoader worker processes."""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from config.errors import UserError
from data.batch import Batch
from data.buckets import Size, bucket_name
from data.dataset import DECODE_ERRORS, TrainDataset, data_root_changed
from data.images import finish_image, load_fitted
from data.plan import BatchPlan, PlanItem

logger = logging.getLogger(__name__)

# Batches each worker decodes ahead of the training loop.
PREFETCH_BATCHES_PER_WORKER = 2
# Decoding in the training process (no workers), decoded images are kept up to this many bytes,
# so that later epochs decode nothing: the CPU such runs share is the training step's. Not with
# data transforms, which run each time an image is used.
IN_PROCESS_MEMO_BYTES = 1 << 30


@dataclass(frozen=True)
class LoadFailure:
    """A user-facing error met while loading a batch, handed over instead of the batch so that
    it reaches the training process as itself, with its one-line message (an exception raised
    in a worker process would come back wrapped in a worker traceback)."""

    error: UserError


def _unchanged(batch: Batch | LoadFailure) -> Batch | LoadFailure:
    """collate_fn: a batch is assembled by the worker already."""
    return batch


class BatchDecoder(TorchDataset):
    """Item i = the i-th batch from (start_epoch, start_batch) on, decoded: what each
    DataLoader worker runs. One loader spans every remaining epoch, so worker processes start
    once per run, not once per epoch; each worker computes an epoch's plan when it first needs
    it (plans are pure functions of the epoch). Epochs may differ in length (rated datasets).

    Files were fully decoded once at scan time, so a failure here means the file changed or
    vanished since. The worker then logs a warning and uses the next image of the same batch
    that still decodes (then the other images of the bucket, with their plain caption, not
    flipped); the batch reports the paths it really holds. A bucket whose every file has become
    unreadable ends the run with `DataRootChangedError`.
    """

    def __init__(
        self,
        dataset: TrainDataset,
        start_epoch: int,
        start_batch: int,
        end_epoch: int,
        grad_accum: int = 1,
    ) -> None:
        self.dataset = dataset
        self.grad_accum = grad_accum
        self.start_epoch = start_epoch
        self.start_batch = start_batch
        lengths = [dataset.batches_in_epoch(e) for e in range(start_epoch, end_epoch)]
        self.epoch_ends = list(itertools.accumulate(lengths))  # counted from start_epoch
        self.length = max(0, (self.epoch_ends[-1] if lengths else 0) - start_batch)
        self.bucket_members = _bucket_members(dataset)
        self._plans: tuple[int, list[BatchPlan]] | None = None
        in_process = dataset.num_workers == 0 and dataset.transforms is None
        self._memo: dict[tuple[int, bool], torch.Tensor] | None = {} if in_process else None
        self._memo_bytes = 0
        self._unreadable: dict[int, str] = {}  # image index → why (in this process)

    def __len__(self) -> int:
        return self.length

    def plan(self, index: int) -> tuple[int, BatchPlan]:
        """(epoch, plan) of item ``index``."""
        position = self.start_batch + index
        offset = bisect.bisect_right(self.epoch_ends, position)
        batch = position - (self.epoch_ends[offset - 1] if offset else 0)
        epoch = self.start_epoch + offset
        if self._plans is None or self._plans[0] != epoch:
            self._plans = (epoch, self.dataset.epoch_batches(epoch, self.grad_accum))
        return epoch, self._plans[1][batch]

    def _decode(self, item: PlanItem, bucket: Size) -> torch.Tensor | None:
        """One image's pixels (from the in-process memo when it holds them); None when the
        file cannot be decoded any more."""
        key = (item.image_index, item.flipped)
        if self._memo is not None and key in self._memo:
            return self._memo[key]
        if item.image_index in self._unreadable:
            return None
        try:
            image = load_fitted(Path(item.path), bucket)
        except DECODE_ERRORS as error:
            logger.warning("cannot decode %s (%s); using another image instead", item.path, error)
            self._unreadable[item.image_index] = f"{item.path}: {error}"
            return None
        # outside the try: an error of a data transform is not a file that went bad
        pixels = finish_image(image, bucket, item.flipped, self.dataset.transforms)
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
            pixels = self._decode(item, plan.bucket)
            if pixels is None:
                continue
            if number > 0:
                logger.warning(
                    "batch %d: %s replaced by %s", plan.index, items[position].path, item.path
                )
            return item, pixels
        last = next(reversed(self._unreadable.values()))
        raise data_root_changed(
            self.dataset.settings.data_root,
            f"no image of bucket {bucket_name(plan.bucket)} can be decoded any more "
            f"({len(self._unreadable)} files failed since the scan; last: {last})",
        )

    def __getitem__(self, index: int) -> Batch | LoadFailure:
        try:
            epoch, plan = self.plan(index)
            decoded = [self._decode_or_substitute(plan, k) for k in range(len(plan.items))]
        except UserError as error:
            return LoadFailure(error)
        # np.stack: one copy without torch's intra-op thread pool (see images.to_tensor)
        pixels = torch.from_numpy(np.stack([pixels.numpy() for _, pixels in decoded]))
        items = tuple(item for item, _ in decoded)
        try:
            return Batch.of(epoch, plan, items, pixels, transforms=self.dataset.transforms)
        except UserError as error:
            return LoadFailure(error)


class InProcessItems:
    """Items 0, 1, ... of a decoder, made in this process when they are asked for: what a
    `DataLoader` without workers or pinning does, without its per-item machinery."""

    def __init__(self, decoder: TorchDataset) -> None:
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.decoder)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch | LoadFailure]:
        return (self.decoder[index] for index in range(len(self)))


class BatchLoader:
    """The batches of a `DataLoader` over a `BatchDecoder` (or of `InProcessItems`); a
    `LoadFailure` from a worker is raised here, in the training process, as the error it
    carries."""

    def __init__(self, loader: DataLoader | InProcessItems) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for item in self.loader:
            if isinstance(item, LoadFailure):
                raise item.error
            yield item


def _bucket_members(dataset: TrainDataset) -> dict[Size, list[PlanItem]]:
    images = dataset.images
    return {
        bucket: [
            PlanItem.of(images[i], images[i].caption, False, images[i].loss_scale) for i in indices
        ]
        for bucket, indices in dataset.buckets.items()
    }


def make_loader(
    dataset: TrainDataset,
    epoch: int,
    start_batch: int = 0,
    pin_memory: bool = False,
    end_epoch: int | None = None,
    grad_accum: int = 1,
) -> BatchLoader:
    """The batches from batch `start_batch` of `epoch` to the end of epoch `end_epoch` - 1
    (default: the end of `epoch`), for this process, planned with windows of `grad_accum`
    batches. The skipped batches are neither decoded nor read: exact resume mid-epoch.

    Each batch is a `Batch` whose ``pixel_values`` are float [B, 3, H, W] in [-1, 1] and whose
    captions are the trained ones (caption transforms, then dropout). Batches are decoded in
    `dataset.num_workers` worker processes (0: in this process, keeping decoded images in
    memory up to IN_PROCESS_MEMO_BYTES when there are no data transforms), started once for the
    whole span; `pin_memory=True` (on CUDA) pins them for fast, asynchronous copies. Iterating
    raises `DataRootChangedError` when the images cannot be read any more, and
    `DataTransformError` for a transform's unusable result.
    """
    end = epoch + 1 if end_epoch is None else end_epoch
    decoder = BatchDecoder(dataset, epoch, start_batch, end, grad_accum)
    return batch_loader(decoder, dataset.num_workers, pin_memory)


def batch_loader(decoder: TorchDataset, workers: int, pin_memory: bool) -> BatchLoader:
    """A loader of the batches ``decoder`` makes (item i = batch i), in ``workers`` processes
    (0: in this one)."""
    if workers == 0 and not pin_memory:
        return BatchLoader(InProcessItems(decoder))
    loader = DataLoader(
        decoder,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_unchanged,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_BATCHES_PER_WORKER if workers > 0 else None,
    )
    return BatchLoader(loader)
