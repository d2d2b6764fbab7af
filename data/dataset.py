"""`TrainDataset`: the scanned images, their epoch plans and how they are decoded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from config.errors import UserError
from data.batch import Batch
from data.buckets import Size, bucket_name, bucket_step
from data.epochs import RatedSchedule, batch_count, epoch_images, slot_counts
from data.errors import DataRootChangedError
from data.images import finish_image, load_fitted
from data.plan import BatchPlan, build_plan
from data.scan import ImageRecord, scan
from data.settings import DataSettings, resolve_num_workers
from data.transforms import DataTransforms

logger = logging.getLogger(__name__)

# What Pillow and the file system raise for a file that changed or vanished after the scan.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def data_root_changed(root: Path, what: str) -> DataRootChangedError:
    """The one-line error for training data that cannot be read any more."""
    if not root.is_dir():
        return DataRootChangedError(
            f"data_root {root}: the folder is gone (deleted, moved or unmounted during "
            f"training); {what}"
        )
    return DataRootChangedError(
        f"data_root {root}: {what}; were files deleted or changed during training?"
    )


class TrainDataset:
    """Images found under data_root, bucketed, with deterministic epoch plans.

    Built once per run by `load_dataset`; nothing here reads the disk again except
    `write_schedule` and `decode` (and the loader, which decodes the pixels). `transforms`
    (None: none) are the data transforms applied wherever the data is loaded; assign them
    before `make_loader` is called.
    """

    def __init__(
        self,
        settings: DataSettings,
        images: list[ImageRecord],
        skipped: list[dict[str, str]],
        transforms: DataTransforms | None = None,
    ) -> None:
        self.settings = settings
        self.images = images
        self.skipped = skipped
        self.transforms = transforms
        members: dict[Size, list[int]] = {}
        for image in images:
            members.setdefault(image.bucket, []).append(image.index)
        # bucket → indices of its images, buckets sorted tallest to widest.
        self.buckets: dict[Size, list[int]] = {
            bucket: members[bucket] for bucket in sorted(members, key=lambda b: (b[0] / b[1], b))
        }
        self.rated = (
            RatedSchedule(settings.max_epochs, settings.rated_dataset_target_dropout_percent)
            if settings.rated_dataset
            else None
        )
        full = slot_counts(epoch_images(images, settings.seed, 0, None))
        self.images_per_epoch = sum(full.values())  # of an epoch that keeps every image
        self._full_epoch_batches = batch_count(full, self.group_size)
        self._steps: dict[int, int] = {}
        self.num_workers = resolve_num_workers(
            settings.dataloader_num_workers, settings.device_type
        )

    @property
    def group_size(self) -> int:
        """Images of one global batch (all processes together)."""
        return self.settings.batch_size * self.settings.world_size

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches of `epoch` for this process (the same for every process). Constant unless
        `rated_dataset` is on, whose epochs keep fewer images as training goes on."""
        if self.rated is None or self.rated.kept_fraction(epoch) >= 1.0:
            return self._full_epoch_batches
        if epoch not in self._steps:
            kept = epoch_images(self.images, self.settings.seed, epoch, self.rated)
            self._steps[epoch] = batch_count(slot_counts(kept), self.group_size)
        return self._steps[epoch]

    def batches_per_epoch(self) -> int:
        """Batches per epoch when every epoch has as many (no rated dataset)."""
        assert self.rated is None, "rated_dataset epochs differ: use batches_in_epoch(epoch)"
        return self._full_epoch_batches

    def batches_in_run(self) -> int:
        """Batches of all `max_epochs` epochs for this process."""
        return sum(self.batches_in_epoch(epoch) for epoch in range(self.settings.max_epochs))

    @property
    def plan_uses_grad_accum(self) -> bool:
        """Whether epoch plans depend on grad_accum (images with a batch_id fill whole
        accumulation windows)."""
        return any(image.batch_id is not None for image in self.images)

    def epoch_batches(self, epoch: int, grad_accum: int = 1) -> list[BatchPlan]:
        """This process's batches of `epoch`: a pure function of (seed, epoch, rank, world_size,
        grad_accum) and the dataset."""
        return build_plan(self.images, self.settings, epoch, grad_accum)

    def decode(self, index: int, flipped: bool) -> torch.Tensor:
        """The pixels of image `index` as trained (bucket size, flipped or not, image transform
        applied): what a latent cache encodes. DataRootChangedError when the file cannot be
        read any more."""
        image = self.images[index]
        try:
            pixels = load_fitted(image.path, image.bucket)
        except DECODE_ERRORS as error:
            raise data_root_changed(
                self.settings.data_root, f"{image.path} cannot be decoded any more ({error})"
            ) from None
        return finish_image(pixels, image.bucket, flipped, self.transforms)

    def batches_without_pixels(
        self, epoch: int, start_batch: int, end_epoch: int, grad_accum: int = 1
    ) -> Iterator[Batch]:
        """The batches from (epoch, start_batch) to the end of epoch end_epoch - 1 without
        pixels (for a latent cache), with the same captions the loader gives (caption
        transforms, then dropout)."""
        for number in range(epoch, end_epoch):
            plans = self.epoch_batches(number, grad_accum)
            for plan in plans[start_batch if number == epoch else 0 :]:
                yield Batch.of(number, plan, transforms=self.transforms)

    def summary(self) -> dict:
        """The dry run's "data" section."""
        settings = self.settings
        summary = {
            "images": len(self.images),
            "skipped": list(self.skipped),
            "buckets": {bucket_name(b): len(indices) for b, indices in self.buckets.items()},
            "steps_per_epoch": self.batches_in_epoch(0),
            "steps_in_run": self.batches_in_run(),
            "images_per_epoch": self.images_per_epoch,
            "batch_size": settings.batch_size,
            "world_size": settings.world_size,
            "resolution": settings.resolution,
            "bucket_step": bucket_step(settings.resolution),
            "dataloader_num_workers": self.num_workers,
        }
        batch_ids = sorted({i.batch_id for i in self.images if i.batch_id is not None})
        if batch_ids:
            summary["batch_ids"] = {b: sum(i.batch_id == b for i in self.images) for b in batch_ids}
        if self.rated is not None:
            epochs = range(settings.max_epochs)
            summary["steps_by_epoch"] = [self.batches_in_epoch(epoch) for epoch in epochs]
        return summary

    def fingerprint(self) -> str:
        """A hash of everything the epoch plans depend on (every field of every image record,
        the settings that shape plans). Store it with a checkpoint: a different value on
        resume means the data order changed. (grad_accum, which shapes the plans of datasets
        with batch ids, is a live setting: the trainer follows its changes itself.)"""
        settings = self.settings
        names = [f.name for f in dataclasses.fields(ImageRecord)]
        content = {
            "images": [[str(getattr(i, name)) for name in names] for i in self.images],
            "settings": [
                settings.resolution,
                settings.batch_size * settings.world_size,  # the global batch: a run may resume
                settings.seed,  # on another number of processes with the same global batch
                settings.shuffle_tags,
                settings.keep_tags,
                settings.rated_dataset,
                settings.rated_dataset_target_dropout_percent,
                settings.max_epochs if settings.rated_dataset else None,
            ],
        }
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def write_schedule(self, epoch: int, path: Path, grad_accum: int = 1) -> None:
        """Write this process's batches of `epoch` as JSON (EveryDream2's --write_schedule).
        Captions are as planned: before caption transforms, with `dropped` for dropout."""
        batches = self.epoch_batches(epoch, grad_accum)
        document = {
            "epoch": epoch,
            "rank": self.settings.rank,
            "world_size": self.settings.world_size,
            "batch_size": self.settings.batch_size,
            "steps": len(batches),
            "batches": [
                {
                    "step": batch.index,
                    "bucket": bucket_name(batch.bucket),
                    "images": [dataclasses.asdict(item) for item in batch.items],
                }
                for batch in batches
            ],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", "utf-8")
        logger.info("wrote the schedule of epoch %d (%d batches) to %s", epoch, len(batches), path)


def load_dataset(settings: DataSettings, transforms: DataTransforms | None = None) -> TrainDataset:
    """Scan data_root once and build the dataset (with `transforms`, None for none).

    Raises UserError (exit 2) for a data_root that does not exist or holds no usable image, an
    unusable folder file, too many images per epoch, or a dataset whose every multiply is 0.
    """
    settings.assert_valid()
    images, skipped = scan(settings)
    dataset = TrainDataset(settings, images, skipped, transforms)
    if dataset.images_per_epoch == 0:
        raise UserError(
            f"data_root: every image under {settings.data_root} has multiply 0; nothing to train"
        )
    steps = (
        f"{dataset.batches_in_epoch(0)} steps per epoch"
        if dataset.rated is None
        else f"{dataset.batches_in_run()} steps in {settings.max_epochs} epochs (rated dataset)"
    )
    logger.info(
        "dataset: %d images in %d buckets, %d skipped, %s (batch %d%s)",
        len(images),
        len(dataset.buckets),
        len(skipped),
        steps,
        settings.batch_size,
        f" × {settings.world_size} processes" if settings.world_size > 1 else "",
    )
    return dataset
