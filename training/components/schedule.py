"""``write_schedule``: each epoch's batches (paths, captions, bucket) in the run folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.components.base import Component

if TYPE_CHECKING:
    from training.loop import Trainer


class ScheduleWriter(Component):
    """``schedule-epNNN.txt`` (1-based epoch numbers) before each epoch, main process only."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        folder = trainer.env.run_folder
        if folder is not None:
            trainer.run.dataset.write_schedule(epoch, folder / f"schedule-ep{epoch + 1:03d}.txt")
