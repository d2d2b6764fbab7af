"""Decoding a fixed list of batches (validation sets), in DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from config.errors import UserError
from data.batch import Batch
from data.dataset import TrainDataset
from data.loader import BatchLoader, LoadFailure, batch_loader
from data.plan import BatchPlan


class FixedBatchDecoder(TorchDataset):
    """Item i = ``plans[i]`` decoded (unflipped pixels at the bucket's size, the dataset's
    transforms applied), as a `Batch` of epoch 0. A file that cannot be decoded any more
    ends the run with `DataRootChangedError` (a validation set has no substitutes: every image
    counts once)."""

    def __init__(self, dataset: TrainDataset, plans: Sequence[BatchPlan]) -> None:
        self.dataset = dataset
        self.plans = list(plans)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> Batch | LoadFailure:
        plan = self.plans[index]
        try:
            decoded = [self.dataset.decode(item.image_index, item.flipped) for item in plan.items]
            # np.stack: one copy without torch's intra-op thread pool (see images.to_tensor)
            pixels = torch.from_numpy(np.stack([p.numpy() for p in decoded]))
            return Batch.of(0, plan, pixel_values=pixels, transforms=self.dataset.transforms)
        except UserError as error:
            return LoadFailure(error)


def fixed_batch_loader(
    dataset: TrainDataset, plans: Sequence[BatchPlan], pin_memory: bool = False
) -> BatchLoader:
    """The decoded batches of ``plans`` in order, in ``dataset.num_workers`` workers (0: in this
    process). Iterating raises `DataRootChangedError` for a file that went bad."""
    workers = min(dataset.num_workers, len(plans))
    return batch_loader(FixedBatchDecoder(dataset, plans), workers, pin_memory)
