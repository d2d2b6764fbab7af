"""Helpers for the data tests: tiny images on disk and DataSettings with test defaults."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image

from data import DataSettings, TrainDataset, load_dataset

TEST_SETTINGS = DataSettings(
    data_root=Path("."),
    resolution=64,
    batch_size=2,
    seed=7,
    flip_p=0.0,
    cond_dropout=0.0,
    shuffle_tags=False,
    keep_tags=0,
    dataloader_num_workers=0,
)


def settings(root: Path, **changes: object) -> DataSettings:
    return replace(TEST_SETTINGS, data_root=root, **changes)


def load(root: Path, **changes: object) -> TrainDataset:
    return load_dataset(settings(root, **changes))


def write_image(
    path: Path,
    size: tuple[int, int] = (32, 32),
    color: tuple[int, int, int] | str = (200, 30, 30),
    mode: str = "RGB",
) -> Path:
    """A plain image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def captions_by_name(dataset: TrainDataset) -> dict[str, str]:
    return {image.path.name: image.caption for image in dataset.images}


def record(dataset: TrainDataset, name: str):
    matches = [image for image in dataset.images if image.path.name == name]
    assert len(matches) == 1, name
    return matches[0]
