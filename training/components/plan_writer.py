"""``write_schedule``: each epoch's plan (batches: paths, captions, bucket) in the run folder."""

from __future__ import annotations

from data import Batch
from training.components.base import Component
from training.context import TrainingContext


class PlanWriter(Component):
    """``schedule-epNNN.txt`` (1-based epoch numbers, EveryDream2's name) when an epoch's first
    batch starts (so with the grad_accum the epoch trains with), main process only."""

    def on_step_start(self, ctx: TrainingContext, batch: Batch) -> None:
        folder = ctx.env.run_folder
        if folder is not None and batch.index == 0:
            path = folder / f"schedule-ep{batch.epoch + 1:03d}.txt"
            ctx.dataset.write_schedule(batch.epoch, path, ctx.settings.grad_accum)
