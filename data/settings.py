"""What the dataset needs to know from train.json, and its checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from config.errors import ConfigError

# Upper bound for the default number of DataLoader workers.
MAX_DEFAULT_WORKERS = 4


@dataclass(frozen=True)
class DataSettings:
    """The train.json keys the dataset uses (same names), already resolved by the config layer.

    `flip_p` and `cond_dropout` are the run-wide defaults; folder files and yaml sidecars may
    override them per image. `rank`/`world_size` describe multi-process training: each process
    trains on its own share of every global batch.
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


def check_settings(settings: DataSettings) -> None:
    """Raise ConfigError listing every value the dataset cannot work with."""
    problems: list[str] = []
    if settings.resolution < 64 or settings.resolution % 64 != 0:
        problems.append(
            f"resolution: must be a multiple of 64 and at least 64 (e.g. 512), got "
            f"{settings.resolution}"
        )
    if settings.batch_size < 1:
        problems.append(f"batch_size: must be at least 1, got {settings.batch_size}")
    for key in ("flip_p", "cond_dropout"):
        value = getattr(settings, key)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{key}: must be between 0 and 1, got {value}")
    if settings.keep_tags < 0:
        problems.append(f"keep_tags: must be 0 or more, got {settings.keep_tags}")
    workers = settings.dataloader_num_workers
    if workers is not None and workers < 0:
        problems.append(f"dataloader_num_workers: must be 0 or more (or null), got {workers}")
    if settings.world_size < 1 or not 0 <= settings.rank < settings.world_size:
        problems.append(
            f"rank/world_size: rank must be in 0..world_size-1, got rank {settings.rank} of "
            f"world_size {settings.world_size}"
        )
    if problems:
        raise ConfigError(problems)


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
