"""What the dataset needs to know from train.json."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from config.fields import defaults_of
from config.train_config import TrainConfig

# Upper bound for the default number of DataLoader workers.
MAX_DEFAULT_WORKERS = 4
_DEFAULTS = defaults_of(TrainConfig)


@dataclass(frozen=True)
class DataSettings:
    """The train.json keys the dataset uses (same names), already validated by the config layer
    (`config/`); the data layer only asserts them (`assert_valid`).

    `flip_p` and `cond_dropout` are the run-wide defaults; folder files and yaml sidecars may
    override them per image. `rank`/`world_size` describe multi-process training: each process
    trains on its own share of every global batch. `max_epochs` and the two `rated_dataset` keys
    decide which images each epoch of a rated dataset keeps.
    """

    data_root: Path
    resolution: int
    batch_size: int
    seed: int
    flip_p: float
    cond_dropout: float
    shuffle_tags: bool
    keep_tags: int
    dataloader_num_workers: int | None
    rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"  # where training runs: decides the default number of workers
    max_epochs: int = _DEFAULTS["max_epochs"]
    rated_dataset: bool = _DEFAULTS["rated_dataset"]
    rated_dataset_target_dropout_percent: int = _DEFAULTS["rated_dataset_target_dropout_percent"]

    def assert_valid(self) -> None:
        """Internal invariants: config/ has already checked every user-facing rule."""
        assert self.resolution >= 64 and self.batch_size >= 1 and self.keep_tags >= 0
        assert 0.0 <= self.flip_p <= 1.0 and 0.0 <= self.cond_dropout <= 1.0
        assert self.dataloader_num_workers is None or self.dataloader_num_workers >= 0
        assert self.world_size >= 1 and 0 <= self.rank < self.world_size
        assert self.max_epochs >= 1
        assert 0 <= self.rated_dataset_target_dropout_percent <= 100


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks of containers and schedulers)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(requested: int | None, device_type: str) -> int:
    """The number of DataLoader worker processes to use.

    An explicit value is used as it is. `None` means: min(4, available CPUs) when training on a
    GPU, whatever the dataset's size (one loader spans the whole run, so workers start once);
    0 when training on the CPU, where decoding in workers would only take cores from the
    training step itself.
    """
    if requested is not None:
        return requested
    if device_type == "cpu":
        return 0
    return min(MAX_DEFAULT_WORKERS, available_cpus())
