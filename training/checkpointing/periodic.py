"""Periodic checkpoints: every ``save_every_n_epochs`` epochs and every ``ckpt_every_n_minutes``.

As in EveryDream2, a run that sets neither saves every 20 minutes; 0 turns either off. Both
start from epoch ``save_ckpts_from_n_epochs``. Periodic checkpoints hold the training state
only with ``save_optimizer``. (The final, interrupted, diverged and crashed checkpoints are the
trainer's own.) Every process decides alike and asks the trainer for the checkpoint.
"""

from __future__ import annotations

import time

from config.live import LiveSettings
from training.components.base import Component, OptimizerStep, SavedCheckpoint
from training.context import TrainingContext
from training.distributed import any_process

DEFAULT_MINUTES = 20.0  # EveryDream2's cadence when neither key is set


def cadence(settings: LiveSettings) -> tuple[int | None, float | None]:
    """(every n epochs, every n minutes) as the run applies them; None: off."""
    epochs, minutes = settings.save_every_n_epochs, settings.ckpt_every_n_minutes
    if epochs is None and minutes is None:
        return None, DEFAULT_MINUTES
    return (epochs or None), (minutes or None)


class PeriodicCheckpoints(Component):
    """Asks for checkpoints between optimizer steps, so every periodic one resumes exactly."""

    def __init__(self) -> None:
        self._last_save = 0.0

    def on_training_start(self, ctx: TrainingContext) -> None:
        self._last_save = time.monotonic()

    def on_checkpoint(self, ctx: TrainingContext, checkpoint: SavedCheckpoint) -> None:
        self._last_save = time.monotonic()

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        _, minutes = cadence(ctx.settings)
        due = minutes is not None and time.monotonic() - self._last_save >= minutes * 60
        # the same decision in every process: their clocks differ
        if any_process(due, ctx.env.device) and self._allowed(ctx):
            self._request(ctx)

    def on_epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        every, _ = cadence(ctx.settings)
        done = epoch + 1
        last = done >= ctx.config.max_epochs  # the final checkpoint follows anyway
        if every is not None and done % every == 0 and not last and self._allowed(ctx):
            self._request(ctx)

    def _request(self, ctx: TrainingContext) -> None:
        # The clock restarts in every process (on_checkpoint is called in the main one only).
        self._last_save = time.monotonic()
        ctx.request_checkpoint("periodic", with_state=ctx.settings.save_optimizer)

    @staticmethod
    def _allowed(ctx: TrainingContext) -> bool:
        return ctx.progress.epoch >= ctx.settings.save_ckpts_from_n_epochs
