"""`Component`: a behaviour the trainer calls at fixed points of the loop.

The trainer runs epochs, accumulation windows and optimizer steps; everything else (progress,
logging, samples, checkpoints, EMA, validation, plugins) is a component. A component overrides
the hooks it needs (all do nothing by default), keeps its own state, and may contribute to the
training state (`state_dict` / `load_state_dict`, stored under its ``name``) so that exact
resume covers it without the trainer knowing what it holds. Building a component has no side
effects; resources (files, writers, bars) are opened in `on_training_start` and released in
`close`.

The hooks, in the order the trainer calls them:

- ``on_training_start`` once, after a resume's state is loaded;
- ``on_epoch_start(epoch)`` before an epoch's first batch;
- ``on_step_start(batch)`` and ``on_step_end(batch, loss)`` around each batch (micro-batch);
  ``loss`` is None when the batch was skipped;
- ``on_optimizer_step(step)`` after each optimizer step (between ``on_step_start`` and
  ``on_step_end`` of a window's last batch), when the run's position already points at the
  next batch, so a checkpoint taken here resumes exactly;
- ``on_epoch_end(epoch)`` after an epoch's last batch;
- ``on_checkpoint(path, kind)`` after each checkpoint is written;
- ``on_training_end(outcome)`` when the loop ends ("finished" or "interrupted"), before the
  final checkpoint; ``close`` always, last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from data import Batch
    from training.loop import Trainer


@dataclass(frozen=True)
class OptimizerStep:
    """What one optimizer step did: the report the trainer hands to components."""

    global_step: int  # optimizer steps done, this one included
    epoch: int  # the epoch the step's batches belong to (0-based)
    loss: float | None  # mean loss of the window's batches (this process's share); None: none
    images: int  # images of all processes in the window
    stepped: bool  # False when the window was skipped (a non-finite loss)
    lrs: dict[str, float]  # model name -> learning rate after the step
    grad_norms: dict[str, float]  # model name -> gradient norm (when measured)


class Component:
    """Base class: every hook does nothing; ``name`` keys the component's saved state."""

    name: ClassVar[str] = ""

    def on_training_start(self, trainer: Trainer) -> None:
        """Before the first batch (after a resumed state is loaded)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def on_step_start(self, trainer: Trainer, batch: Batch) -> None:
        """Before each batch."""

    def on_step_end(self, trainer: Trainer, batch: Batch, loss: float | None) -> None:
        """After each batch (and after the optimizer step it completed, if any)."""

    def on_optimizer_step(self, trainer: Trainer, step: OptimizerStep) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After the last batch of ``epoch``."""

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        """After a checkpoint was written at ``path`` (main process)."""

    def on_training_end(self, trainer: Trainer, outcome: str) -> None:
        """When the loop ends ("finished" or "interrupted"), before the final checkpoint."""

    def close(self) -> None:
        """Release resources; called once, whatever happened."""

    def state_dict(self) -> dict[str, Any] | None:
        """What exact resume needs (tensors, numbers, strings, containers); None: nothing."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state that `state_dict` returned."""

    def describe(self) -> dict[str, Any] | None:
        """A JSON-able summary for the dry run and the run's config.json; None: nothing."""
        return None
