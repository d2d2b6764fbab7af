"""Periodic checkpoints: every ``save_every_n_epochs`` epochs and every ``ckpt_every_n_minutes``.

As in EveryDream2, a run that sets neither saves every 20 minutes; 0 turns either off. Both
start from epoch ``save_ckpts_from_n_epochs``. Periodic checkpoints hold the training state
only with ``save_optimizer``. (The final, interrupted, diverged and crashed checkpoints are the
trainer's own.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from config.train_config import TrainConfig
from training.components.base import Component, OptimizerStep
from training.distributed import any_process

if TYPE_CHECKING:
    from training.loop import Trainer

DEFAULT_MINUTES = 20.0  # EveryDream2's cadence when neither key is set


def cadence(config: TrainConfig) -> tuple[int | None, float | None]:
    """(every n epochs, every n minutes) as the run applies them; None: off."""
    epochs, minutes = config.save_every_n_epochs, config.ckpt_every_n_minutes
    if epochs is None and minutes is None:
        return None, DEFAULT_MINUTES
    return (epochs or None), (minutes or None)


class PeriodicCheckpoints(Component):
    """Saves between optimizer steps, so every periodic checkpoint resumes exactly."""

    def __init__(self) -> None:
        self._last_save = 0.0

    def on_training_start(self, trainer: Trainer) -> None:
        self._last_save = time.monotonic()

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        self._last_save = time.monotonic()

    def on_optimizer_step(self, trainer: Trainer, step: OptimizerStep) -> None:
        _, minutes = cadence(trainer.config)
        due = minutes is not None and time.monotonic() - self._last_save >= minutes * 60
        # the same decision in every process: their clocks differ
        if any_process(due, trainer.env.device) and self._allowed(trainer):
            trainer.save("periodic", with_state=trainer.config.save_optimizer)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every, _ = cadence(trainer.config)
        done = epoch + 1
        last = done >= trainer.config.max_epochs  # the final checkpoint follows anyway
        if every is not None and done % every == 0 and not last and self._allowed(trainer):
            trainer.save("periodic", with_state=trainer.config.save_optimizer)

    @staticmethod
    def _allowed(trainer: Trainer) -> bool:
        return trainer.counters.epoch >= trainer.config.save_ckpts_from_n_epochs
