"""`TrainingWeights`: a schedule-free run's training weights, saved for an exact resume.

Checkpoints hold a schedule-free optimizer's evaluation weights (`optimizer.schedule_free`);
the weights training continues from are the other sequence. This component stores them in the
training state and puts them back into the parameters when a resumed run starts.
"""

from __future__ import annotations

from typing import Any

import torch

from config.errors import UserError
from optimizer.schedule_free import has_eval_mode, parameters_of
from training.components.base import Component
from training.context import TrainingContext


class TrainingWeights(Component):
    """Saves and restores the training weights of schedule-free optimizers."""

    name = "schedule_free"

    def __init__(self) -> None:
        self._ctx: TrainingContext | None = None
        self._saved: dict[str, list[torch.Tensor]] | None = None

    def on_training_start(self, ctx: TrainingContext) -> None:
        self._ctx = ctx
        saved, self._saved = self._saved, None
        if saved is None:
            return
        with torch.no_grad():
            for name, optimizer in self._optimizers(ctx).items():
                tensors = saved.get(name)
                parameters = parameters_of(optimizer)
                if tensors is None or len(tensors) != len(parameters):
                    raise UserError(
                        f"resume_ckpt: the schedule-free training weights of {name} in its "
                        "training state do not fit this run"
                    )
                for parameter, tensor in zip(parameters, tensors, strict=True):
                    parameter.copy_(tensor)

    @staticmethod
    def _optimizers(ctx: TrainingContext) -> dict[str, torch.optim.Optimizer]:
        return {name: o for name, o in ctx.optimizers.items() if has_eval_mode(o)}

    def state_dict(self) -> dict[str, Any] | None:
        if self._ctx is None:
            return None
        return {
            name: [p.detach().to("cpu", copy=True) for p in parameters_of(optimizer)]
            for name, optimizer in self._optimizers(self._ctx).items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state
