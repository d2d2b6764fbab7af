"""The image sets validation evaluates, built once before any model loads.

- ``val``: with ``val_split_mode: automatic`` a share of data_root's images held out of
  training (the training dataset is rebuilt without them, so its steps, LR schedule and
  fingerprint count only the images it trains on); with ``manual`` the images of
  ``manual_data_root``;
- one set per ``extra_manual_datasets`` entry, logged as ``loss/<name>``;
- ``train-stabilized``: with ``stabilize_training_loss`` a share of the training images (they
  stay in training).

Folders are scanned like data_root (captions, folder files, buckets at the run's resolution).
Every image is evaluated once, unflipped, with its whole caption, in fixed batches.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.errors import UserError
from config.load import LoadedTrainConfig, find_input_file
from config.validation_config import (
    STABILIZED_NAME,
    VAL_NAME,
    ValidationSettings,
    load_validation_config,
)
from data import BatchPlan, DataSettings, ImageRecord, TrainDataset
from data.holdout import fixed_batches, for_evaluation, split, without
from data.scan import scan

logger = logging.getLogger(__name__)

VALIDATION = "val"  # kinds of sets: held out or manual, extra, stabilizing
EXTRA = "extra"
STABILIZE = "stabilize"


@dataclass(frozen=True)
class EvalSet:
    """One evaluated set: logged as ``loss/<name>``; its images and fixed batches."""

    name: str
    kind: str
    dataset: TrainDataset
    plans: tuple[BatchPlan, ...]
    origin: str  # where the images come from, in words

    def describe(self) -> dict[str, Any]:
        return {
            "images": len(self.dataset.images),
            "batches": len(self.plans),
            "from": self.origin,
            "skipped": len(self.dataset.skipped),
        }


@dataclass(frozen=True)
class ValidationData:
    """The checked settings and the sets they make; ``train_images`` counts what trains."""

    settings: ValidationSettings
    sets: tuple[EvalSet, ...]
    batch_size: int
    train_images: int

    def describe(self) -> dict[str, Any]:
        """The dry run's "validation" section."""
        s = self.settings
        return {
            "config": str(s.path),
            "train_images": self.train_images,
            "sets": {eval_set.name: eval_set.describe() for eval_set in self.sets},
            "batch_size": self.batch_size,
            "every_n_epochs": s.every_n_epochs,
            "seed": s.seed,
            "use_relative_loss": s.use_relative_loss,
        }


def load_validation_settings(train: LoadedTrainConfig) -> ValidationSettings | None:
    """The ``validation_config`` file, found and checked (None when not set)."""
    value = train.config.validation_config
    if value is None:
        return None
    return load_validation_config(find_input_file(value, train.folder, "validation_config"))


def prepare_validation(
    settings: ValidationSettings | None, dataset: TrainDataset
) -> tuple[TrainDataset, ValidationData | None]:
    """(the training dataset, the validation sets): the dataset loses the held-out images."""
    if settings is None:
        return dataset, None
    if not settings.evaluates_anything:
        logger.info(
            "validation config %s: nothing to evaluate (validate_training is false, no extra "
            "dataset, no stabilize_training_loss)",
            settings.path,
        )
        return dataset, None
    where = f"validation config {settings.path}"
    batch_size = dataset.settings.batch_size if settings.batch_size is None else settings.batch_size
    sets: list[EvalSet] = []
    if settings.holds_out:
        dataset, held_out = _hold_out(settings, dataset, batch_size, where)
        sets.append(held_out)
    sets.extend(_scanned_sets(settings, dataset, batch_size, where))
    if settings.stabilize_training_loss:
        proportion = settings.stabilize_split_proportion
        chosen, _ = split(dataset.images, proportion, settings.seed, "stabilize")
        origin = f"training images (stabilize_split_proportion {proportion:g})"
        sets.append(
            _eval_set(
                STABILIZED_NAME, STABILIZE, chosen, dataset.settings, settings, batch_size, origin
            )
        )
    for eval_set in sets:
        _log_set(eval_set)
    data = ValidationData(settings, tuple(sets), batch_size, len(dataset.images))
    return dataset, data


def _scanned_sets(
    settings: ValidationSettings, dataset: TrainDataset, batch_size: int, where: str
) -> list[EvalSet]:
    """The sets scanned from their own folders: ``manual_data_root`` and the extra datasets."""
    folders: list[tuple[str, str, Path, str]] = []
    if settings.manual_data_root is not None:
        folders.append((VAL_NAME, VALIDATION, settings.manual_data_root, "manual_data_root"))
    for name, folder in settings.extra.items():
        folders.append((name, EXTRA, folder, f"extra_manual_datasets.{name}"))
    return [
        _scanned(name, kind, folder, dataset.settings, settings, batch_size, f"{where}: {key}")
        for name, kind, folder, key in folders
    ]


def _log_set(eval_set: EvalSet) -> None:
    logger.info(
        "validation set %s: %d images in %d batches, %s",
        eval_set.name,
        len(eval_set.dataset.images),
        len(eval_set.plans),
        eval_set.origin,
    )


def _hold_out(
    settings: ValidationSettings, dataset: TrainDataset, batch_size: int, where: str
) -> tuple[TrainDataset, EvalSet]:
    """The automatic split: the training dataset without the held-out images, and their set."""
    proportion = settings.auto_split_proportion
    held, _ = split(dataset.images, proportion, settings.seed, "validation")
    kept = without(dataset, held)
    if kept.images_per_epoch == 0:
        raise UserError(
            f"{where}: auto_split_proportion: holding out {len(held)} of "
            f"{len(dataset.images)} images ({proportion:g}) leaves nothing to train on; lower it "
            "or use val_split_mode manual"
        )
    logger.info(
        "validation: %d of %d images held out of training (auto_split_proportion %g, seed %d)",
        len(held),
        len(dataset.images),
        proportion,
        settings.seed,
    )
    origin = f"held out of data_root (auto_split_proportion {proportion:g})"
    held_set = _eval_set(VAL_NAME, VALIDATION, held, dataset.settings, settings, batch_size, origin)
    return kept, held_set


def _scanned(
    name: str,
    kind: str,
    folder: Path,
    train: DataSettings,
    settings: ValidationSettings,
    batch_size: int,
    where: str,
) -> EvalSet:
    """A set scanned from ``folder`` like data_root; errors name the validation file's key."""
    try:
        records, skipped = scan(dataclasses.replace(train, data_root=folder))
    except UserError as error:
        message = str(error).removeprefix("data_root: ")
        raise UserError(f"{where}: {message}") from None
    if not any(record.multiply > 0 for record in records):
        raise UserError(f"{where}: every image under {folder} has multiply 0; nothing to evaluate")
    here = dataclasses.replace(train, data_root=folder)
    return _eval_set(name, kind, records, here, settings, batch_size, str(folder), skipped)


def _eval_set(
    name: str,
    kind: str,
    records: list[ImageRecord],
    train: DataSettings,
    settings: ValidationSettings,
    batch_size: int,
    origin: str,
    skipped: list[dict[str, str]] | None = None,
) -> EvalSet:
    """A set of ``records`` as they are evaluated, in fixed batches; no data transforms."""
    evaluated = for_evaluation(records)
    data_settings = dataclasses.replace(
        train,
        batch_size=batch_size,
        seed=settings.seed,
        flip_p=0.0,
        cond_dropout=0.0,
        shuffle_tags=False,
        rank=0,
        world_size=1,
        rated_dataset=False,
    )
    dataset = TrainDataset(data_settings, evaluated, skipped or [], transforms=None)
    return EvalSet(name, kind, dataset, tuple(fixed_batches(evaluated, batch_size)), origin)
