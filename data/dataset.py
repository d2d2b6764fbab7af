"""`TrainDataset`: the scanned images and their epoch plans."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from config.errors import UserError
from data.buckets import Size, bucket_name, bucket_step
from data.plan import BatchPlan, build_plan, global_batch_count, slots_per_bucket
from data.scan import ImageRecord, scan
from data.settings import DataSettings, check_settings, resolve_num_workers

logger = logging.getLogger(__name__)


class TrainDataset:
    """Images found under data_root, bucketed, with deterministic epoch plans.

    Built once per run by `load_dataset`; nothing here reads the disk again except
    `write_schedule` (and the loader, which decodes the pixels).
    """

    def __init__(
        self, settings: DataSettings, images: list[ImageRecord], skipped: list[dict[str, str]]
    ) -> None:
        self.settings = settings
        self.images = images
        self.skipped = skipped
        members: dict[Size, list[int]] = {}
        for image in images:
            members.setdefault(image.bucket, []).append(image.index)
        # bucket → indices of its images, buckets sorted tallest to widest.
        self.buckets: dict[Size, list[int]] = {
            bucket: members[bucket] for bucket in sorted(members, key=lambda b: (b[0] / b[1], b))
        }
        self.images_per_epoch = sum(slots_per_bucket(images).values())
        self.num_workers = resolve_num_workers(
            settings.dataloader_num_workers, settings.device_type
        )

    def steps_per_epoch(self) -> int:
        """Batches per epoch for this process (the same for every process)."""
        return global_batch_count(self.images, self.settings.batch_size * self.settings.world_size)

    def epoch_batches(self, epoch: int) -> list[BatchPlan]:
        """This process's batches of `epoch`: a pure function of (seed, epoch, rank, world_size)
        and the dataset."""
        settings = self.settings
        return build_plan(
            self.images,
            seed=settings.seed,
            epoch=epoch,
            batch_size=settings.batch_size,
            rank=settings.rank,
            world_size=settings.world_size,
            shuffle_tags=settings.shuffle_tags,
            keep_tags=settings.keep_tags,
        )

    def summary(self) -> dict:
        """The dry run's "data" section."""
        settings = self.settings
        return {
            "images": len(self.images),
            "skipped": list(self.skipped),
            "buckets": {bucket_name(b): len(indices) for b, indices in self.buckets.items()},
            "steps_per_epoch": self.steps_per_epoch(),
            "images_per_epoch": self.images_per_epoch,
            "batch_size": settings.batch_size,
            "world_size": settings.world_size,
            "resolution": settings.resolution,
            "bucket_step": bucket_step(settings.resolution),
            "dataloader_num_workers": self.num_workers,
        }

    def fingerprint(self) -> str:
        """A hash of everything the epoch plans depend on (images, captions, sizes, settings).
        Store it with a checkpoint: a different value on resume means the data order changed."""
        settings = self.settings
        content = {
            "images": [
                [
                    str(i.path),
                    i.size,
                    i.bucket,
                    i.caption,
                    i.parts,
                    i.weights,
                    i.multiply,
                    i.flip_p,
                    i.cond_dropout,
                ]
                for i in self.images
            ],
            "settings": [
                settings.resolution,
                settings.batch_size,
                settings.seed,
                settings.shuffle_tags,
                settings.keep_tags,
                settings.world_size,
            ],
        }
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def write_schedule(self, epoch: int, path: Path) -> None:
        """Write this process's batches of `epoch` as JSON (EveryDream2's --write_schedule)."""
        batches = self.epoch_batches(epoch)
        document = {
            "epoch": epoch,
            "rank": self.settings.rank,
            "world_size": self.settings.world_size,
            "batch_size": self.settings.batch_size,
            "steps": len(batches),
            "batches": [
                {
                    "step": batch.step,
                    "bucket": bucket_name(batch.bucket),
                    "images": [
                        {
                            "path": item.path,
                            "caption": item.caption,
                            "flipped": item.flipped,
                            "image_index": item.image_index,
                        }
                        for item in batch.items
                    ],
                }
                for batch in batches
            ],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", "utf-8")
        logger.info("wrote the schedule of epoch %d (%d batches) to %s", epoch, len(batches), path)


def load_dataset(settings: DataSettings) -> TrainDataset:
    """Scan data_root once and build the dataset.

    Raises UserError (exit 2) for bad settings, a data_root that does not exist or holds no
    usable image, an unusable folder file, or a dataset whose every multiply is 0.
    """
    check_settings(settings)
    images, skipped = scan(settings)
    dataset = TrainDataset(settings, images, skipped)
    if dataset.images_per_epoch == 0:
        raise UserError(
            f"data_root: every image under {settings.data_root} has multiply 0; nothing to train"
        )
    logger.info(
        "dataset: %d images in %d buckets, %d skipped, %d steps per epoch (batch %d%s)",
        len(images),
        len(dataset.buckets),
        len(skipped),
        dataset.steps_per_epoch(),
        settings.batch_size,
        f" × {settings.world_size} processes" if settings.world_size > 1 else "",
    )
    return dataset
