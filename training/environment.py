"""`Environment`: where and how a run trains: device, processes, precision, outputs, data source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.fsdp import Sharding
from training.metrics import Metrics
from training.precision import Precision
from training.sources import BatchSource
from training.step import Shard


@dataclass(frozen=True)
class Environment:
    """What the trainer and its components need to know about this process and run.

    ``run_folder`` and ``metrics`` exist in the main process only (None elsewhere).
    ``run_id`` (the run folder's name and a random part) is written in every checkpoint.
    ``sharding``: the trained models are sharded over the processes (FSDP): every process takes
    part in each forward pass (samples too) and in each checkpoint's gathering.
    """

    device: torch.device
    shard: Shard
    precision: Precision
    source: BatchSource
    is_main_process: bool
    run_id: str
    run_folder: Path | None
    checkpoint_dir: Path
    metrics: Metrics | None
    barrier: Callable[[], None]
    sharding: Sharding | None = None
