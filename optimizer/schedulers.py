"""LR schedules through `diffusers.optimization.get_scheduler` (docs/configuration.md).

The run-length defaults are EveryDream2's (``optimizer/optimizers.py``), counted in optimizer
steps: ``lr_decay_steps`` null → ``int(1.5 × steps)``, ``lr_warmup_steps`` null →
``int(decay / 50)`` (2%, rounded down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.choices import LR_SCHEDULERS

if TYPE_CHECKING:
    import torch

DECAY_STEPS_FACTOR = 1.5  # lr_decay_steps null → 1.5 × the run's optimizer steps
WARMUP_DIVISOR = 50  # lr_warmup_steps null → lr_decay_steps / 50 (2%), rounded down


def scheduler_names() -> tuple[str, ...]:
    """Every valid `lr_scheduler` value (diffusers' names without piecewise_constant)."""
    return LR_SCHEDULERS


@dataclass(frozen=True)
class ScheduleLength:
    """Warm-up and decay steps of one schedule, after the run-length defaults."""

    warmup_steps: int
    decay_steps: int


def schedule_length(
    warmup_steps: int | None, decay_steps: int | None, total_optimizer_steps: int
) -> ScheduleLength:
    """Fill the defaults that depend on the run length, rounding down as EveryDream2 does."""
    if decay_steps is None:
        decay_steps = max(1, int(DECAY_STEPS_FACTOR * total_optimizer_steps))
    if warmup_steps is None:
        warmup_steps = decay_steps // WARMUP_DIVISOR
    return ScheduleLength(warmup_steps, decay_steps)


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, length: ScheduleLength
) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=length.warmup_steps,
        num_training_steps=length.decay_steps,
    )


def optimizer_steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    """Accumulation windows start afresh each epoch, so they never drift; the last may be short."""
    return -(-batches_per_epoch // grad_accum)
