"""Components: what a run does besides its steps, called at the trainer's hooks (`base`).

`build.build_components` makes a run's components. This package's own module imports only
`base`, so that a module elsewhere that defines a component (the periodic checkpoints of
`training.checkpointing`) can be imported first.
"""

from __future__ import annotations

from training.components.base import Component, OptimizerStep, SavedCheckpoint

__all__ = ["Component", "OptimizerStep", "SavedCheckpoint"]
