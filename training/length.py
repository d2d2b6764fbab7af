"""How long a run is in optimizer steps: the planned length, and what is left.

Accumulation windows restart every epoch, so an epoch of B batches takes ceil(B / grad_accum)
optimizer steps. The run's LR schedule (its automatic warm-up and decay lengths) and the EMA's
``ema_strength_target`` are sized once, when the run starts, with the grad_accum in force then:
that grad_accum is stored in every training state, so a resumed run sizes them the same way,
whatever grad_accum it trains with now. A change of grad_accum during a run changes how many
optimizer steps are left, not the schedule (as in EveryDream2): see docs/checkpoints.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from config.errors import ConfigError
from config.limits import MAX_STEPS
from optimizer.schedulers import optimizer_steps_per_epoch


class EpochLengths(Protocol):
    """What the length of a run depends on (a `data.TrainDataset`)."""

    def batches_in_epoch(self, epoch: int) -> int: ...


@dataclass(frozen=True)
class RunLength:
    """The length the run's LR schedule and EMA decay were sized for."""

    schedule_grad_accum: int  # the grad_accum in force when the run started
    planned_steps: int  # optimizer steps of the run with that grad_accum

    @classmethod
    def plan(cls, data: EpochLengths, max_epochs: int, grad_accum: int) -> RunLength:
        """The length of ``max_epochs`` epochs at ``grad_accum``; more than `MAX_STEPS`
        optimizer steps is a ConfigError naming why."""
        steps = optimizer_steps(data, max_epochs, grad_accum)
        if steps > MAX_STEPS:
            raise ConfigError(
                [
                    f"max_epochs: {max_epochs} epochs make {steps} optimizer steps; a run may "
                    f"have at most {MAX_STEPS}: lower max_epochs (or raise batch_size or "
                    "grad_accum, or use fewer images)"
                ]
            )
        return cls(grad_accum, steps)


def optimizer_steps(data: EpochLengths, max_epochs: int, grad_accum: int, epoch: int = 0) -> int:
    """Optimizer steps of the epochs from ``epoch`` to the end of the run."""
    epochs = range(epoch, max_epochs)
    return sum(optimizer_steps_per_epoch(data.batches_in_epoch(e), grad_accum) for e in epochs)
