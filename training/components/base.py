"""`Component`: a behaviour the trainer calls at fixed points of the loop.

The trainer runs epochs, accumulation windows and optimizer steps; everything else (progress,
logging, samples, checkpoints, EMA, validation, plugins) is a component. A component overrides
the hooks it needs (all do nothing by default), keeps its own state, and may contribute to the
training state (`state_dict` / `load_state_dict`, stored under its ``name``) so that exact
resume covers it without the trainer knowing what it holds. Building a component has no side
effects; resources (files, writers, bars) are opened in `on_training_start` and released in
`close`.

Every hook receives the run's `training.context.TrainingContext`: what the component may read,
and the commands it may give (a checkpoint, a change of a live setting). No component assigns to
the trainer. The hooks, in the order the trainer calls them:

- ``on_training_start`` once, after a resume's state is loaded;
- ``on_epoch_start(epoch)`` before an epoch's first batch (setting changes requested here apply
  to this epoch);
- ``on_step_start(batch)`` and ``on_step_end(batch, loss)`` around each batch (micro-batch);
  ``loss`` is None when the batch was skipped;
- ``on_optimizer_step(step)`` after each optimizer step (between ``on_step_start`` and
  ``on_step_end`` of a window's last batch), when the run's position already points at the
  next batch, so a checkpoint taken here resumes exactly;
- ``on_epoch_end(epoch)`` after an epoch's last batch;
- ``on_checkpoint(checkpoint)`` after each checkpoint is written (main process);
- ``on_training_end(outcome)`` when the loop ends ("finished" or "interrupted"), before the
  final checkpoint; ``close`` always, last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data import Batch
from training.context import TrainingContext


@dataclass(frozen=True)
class OptimizerStep:
    """What one optimizer step did: the report the trainer hands to components."""

    global_step: int  # optimizer steps done, this one included
    epoch: int  # the epoch the step's batches belong to (0-based)
    window: int  # the accumulation window's index in that epoch (0-based)
    windows_in_epoch: int  # accumulation windows (optimizer steps) of that epoch
    loss: float | None  # mean loss of the window's batches (this process's share); None: none
    images: int  # images of all processes in the window
    stepped: bool  # False when the window was skipped (a non-finite loss)
    lrs: dict[str, float]  # model name -> learning rate after the step
    grad_norms: dict[str, float]  # model name -> gradient norm (when measured)
    grad_scale: float | None = None  # the fp16 grad scaler's scale after the step; None: off


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint just written: where, and why (one of the checkpoint kinds)."""

    path: Path
    kind: str


class Component:
    """Base class: every hook does nothing; ``name`` keys the component's saved state."""

    name: ClassVar[str] = ""

    def on_training_start(self, ctx: TrainingContext) -> None:
        """Before the first batch (after a resumed state is loaded)."""

    def on_epoch_start(self, ctx: TrainingContext, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def on_step_start(self, ctx: TrainingContext, batch: Batch) -> None:
        """Before each batch."""

    def on_step_end(self, ctx: TrainingContext, batch: Batch, loss: float | None) -> None:
        """After each batch (and after the optimizer step it completed, if any)."""

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        """After the last batch of ``epoch``."""

    def on_checkpoint(self, ctx: TrainingContext, checkpoint: SavedCheckpoint) -> None:
        """After a checkpoint was written (main process)."""

    def on_training_end(self, ctx: TrainingContext, outcome: str) -> None:
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


class Hooks:
    """The components of a run, called in order at each hook (each hook calls only the
    components that override it: a step then skips the do-nothing defaults)."""

    def __init__(self, components: Sequence[Component]) -> None:
        self.components = list(components)
        self._training_start = _overriding(self.components, "on_training_start")
        self._epoch_start = _overriding(self.components, "on_epoch_start")
        self._step_start = _overriding(self.components, "on_step_start")
        self._step_end = _overriding(self.components, "on_step_end")
        self._optimizer_step = _overriding(self.components, "on_optimizer_step")
        self._epoch_end = _overriding(self.components, "on_epoch_end")
        self._checkpoint = _overriding(self.components, "on_checkpoint")
        self._training_end = _overriding(self.components, "on_training_end")

    def training_start(self, ctx: TrainingContext) -> None:
        for hook in self._training_start:
            hook(ctx)

    def epoch_start(self, ctx: TrainingContext, epoch: int) -> None:
        for hook in self._epoch_start:
            hook(ctx, epoch)

    def step_start(self, ctx: TrainingContext, batch: Batch) -> None:
        for hook in self._step_start:
            hook(ctx, batch)

    def step_end(self, ctx: TrainingContext, batch: Batch, loss: float | None) -> None:
        for hook in self._step_end:
            hook(ctx, batch, loss)

    def optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        for hook in self._optimizer_step:
            hook(ctx, step)

    def epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        for hook in self._epoch_end:
            hook(ctx, epoch)

    def checkpoint(self, ctx: TrainingContext, checkpoint: SavedCheckpoint) -> None:
        for hook in self._checkpoint:
            hook(ctx, checkpoint)

    def training_end(self, ctx: TrainingContext, outcome: str) -> None:
        for hook in self._training_end:
            hook(ctx, outcome)

    def close(self) -> None:
        for component in self.components:
            component.close()

    def states(self) -> dict[str, Any]:
        """Every named component's state (what the training state stores)."""
        return {
            c.name: state
            for c in self.components
            if c.name and (state := c.state_dict()) is not None
        }

    def load_states(self, states: dict[str, Any]) -> None:
        for component in self.components:
            if component.name and component.name in states:
                component.load_state_dict(states[component.name])


def _overriding(components: Sequence[Component], name: str) -> list[Callable[..., None]]:
    """The bound hook ``name`` of each component whose class overrides `Component`'s, in order."""
    default = getattr(Component, name)
    return [getattr(c, name) for c in components if getattr(type(c), name) is not default]
