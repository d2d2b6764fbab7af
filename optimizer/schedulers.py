"""LR schedules through `diffusers.optimization.get_scheduler` (SPEC §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.optimization import SchedulerType, get_scheduler

# piecewise_constant needs step rules that optimizer.json has no key for.
_LEFT_OUT = {SchedulerType.PIECEWISE_CONSTANT}

DECAY_STEPS_FACTOR = 1.5  # lr_decay_steps null → 1.5 × the run's optimizer steps
WARMUP_FRACTION = 0.02  # lr_warmup_steps null → 2% of lr_decay_steps


def scheduler_names() -> tuple[str, ...]:
    """Every valid `lr_scheduler` value."""
    return tuple(s.value for s in SchedulerType if s not in _LEFT_OUT)


@dataclass(frozen=True)
class ScheduleLength:
    """Warm-up and decay steps of one schedule, after the run-length defaults."""

    warmup_steps: int
    decay_steps: int


def schedule_length(
    warmup_steps: int | None, decay_steps: int | None, total_optimizer_steps: int
) -> ScheduleLength:
    """Fill the defaults that depend on the run length."""
    if decay_steps is None:
        decay_steps = max(1, math.ceil(DECAY_STEPS_FACTOR * total_optimizer_steps))
    if warmup_steps is None:
        warmup_steps = math.ceil(WARMUP_FRACTION * decay_steps)
    return ScheduleLength(warmup_steps, decay_steps)


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, length: ScheduleLength
) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per optimizer step."""
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=length.warmup_steps,
        num_training_steps=length.decay_steps,
    )


def optimizer_steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    """Accumulation windows start afresh each epoch, so they never drift; the last may be short."""
    return math.ceil(batches_per_epoch / grad_accum)


def total_optimizer_steps(batches_per_epoch: int, max_epochs: int, grad_accum: int) -> int:
    """Optimizer steps in a whole run."""
    return max_epochs * optimizer_steps_per_epoch(batches_per_epoch, grad_accum)
