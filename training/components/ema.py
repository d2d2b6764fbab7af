"""EMA: a moving average of the trained weights, its ``_ema`` checkpoints and its samples.

Registered before the samples and checkpoint components: it updates on ``on_optimizer_step``,
so samples and checkpoints of the same step see the updated EMA. The EMA exists in the main
process only (the others hold the same weights and never save or sample). Its weights and
update count are part of the training state, so exact resume covers them bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.errors import UserError
from training.checkpoint import save_checkpoint
from training.components.base import Component, OptimizerStep
from training.ema import (
    EMA_SUFFIX,
    EmaSettings,
    ParameterEMA,
    load_start_weights,
    tracked_parameters,
)

if TYPE_CHECKING:
    from training.loop import Trainer

logger = logging.getLogger(__name__)


def ema_checkpoint_path(path: Path) -> Path:
    """Where the EMA pipeline of checkpoint ``path`` goes: ``<path>_ema`` (EveryDream2's name)."""
    return path.with_name(f"{path.name}{EMA_SUFFIX}")


class EMA(Component):
    """Keeps the EMA, writes ``<checkpoint>_ema`` beside each checkpoint, lends its weights."""

    name = "ema"

    def __init__(self, settings: EmaSettings) -> None:
        self.settings = settings
        self.weights: ParameterEMA | None = None
        self.updates = 0
        self._saved: dict[str, Any] | None = None

    def on_training_start(self, trainer: Trainer) -> None:
        saved, self._saved = self._saved, None
        if not trainer.env.is_main_process:
            return
        trained = [training.model_name for training in trainer.trainings]
        parameters = tracked_parameters(trainer.models.bundle, trained)
        names = [name for name, _ in parameters]
        s = self.settings
        if saved is not None:
            where = f"the training state of {trainer.config.resume_ckpt}"
            origin, start = f"resume_ckpt: the EMA in {where}", saved["weights"]
            self.updates = int(saved["updates"])
        elif s.start_model is not None:
            where, origin = s.start_model, f"ema_resume_model: {s.start_model}"
            start = load_start_weights(s.start_model, names)
        else:
            where, origin, start = "the weights training starts from", "", None
        self.weights = ParameterEMA(parameters, s.device, start, origin)
        logger.info(
            "EMA of %s: decay %.10g every %d optimizer steps (%d updates in the run), in %s "
            "memory, from %s",
            " and ".join(trained),
            s.decay,
            s.interval,
            s.updates_in_run,
            s.device,
            where,
        )

    def on_optimizer_step(self, trainer: Trainer, step: OptimizerStep) -> None:
        if self.weights is not None and step.global_step % self.settings.interval == 0:
            self.weights.update(self.settings.decay)
            self.updates += 1

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        """``<path>_ema``: the pipeline with the EMA weights (and ``<path>_ema.safetensors``)."""
        if self.weights is None:
            return
        note = {
            "run": trainer.env.run_id,
            "kind": kind,
            "ema": True,
            "decay": self.settings.decay,
            "ema_updates": self.updates,
        }
        with self.weights.swapped_in():
            save_checkpoint(
                ema_checkpoint_path(path),
                trainer.models.bundle,
                None,
                trainer.config.save_full_precision,
                note=note,
                single_file=not trainer.config.no_save_ckpt,
            )

    def sample_weights(self) -> list[tuple[str, contextlib.AbstractContextManager[Any]]]:
        """What samples are drawn with: (name suffix, context in which the live modules hold
        those weights) for the trained weights ("") and/or the EMA ("_ema"), as configured."""
        weights: list[tuple[str, contextlib.AbstractContextManager[Any]]] = []
        if self.settings.sample_trained:
            weights.append(("", contextlib.nullcontext()))
        if self.settings.sample_ema and self.weights is not None:
            weights.append((EMA_SUFFIX, self.weights.swapped_in()))
        return weights

    def state_dict(self) -> dict[str, Any] | None:
        if self.weights is None:
            return None
        return {
            "weights": self.weights.state_dict(),
            "updates": self.updates,
            "decay": self.settings.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("weights"), dict) or not isinstance(state.get("updates"), int):
            raise UserError("resume_ckpt: the EMA in its training state is malformed")
        self._saved = state

    def describe(self) -> dict[str, Any] | None:
        return self.settings.describe()
