"""The trainer's side of checkpoints: its training state, restoring it, and saving.

A `Checkpointer` belongs to one `Trainer`. It gathers the training state (counters,
optimizers, schedulers, grad scaler, RNG states, every component's state), names and writes
checkpoints (main process), and saves a ``crashed-`` checkpoint after an unexpected error.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.checkpoint import (
    TRAINABLE,
    checkpoint_note,
    frozen_weights_reference,
    save_checkpoint,
)
from training.names import checkpoint_name, free_path
from training.state import TrainingState

if TYPE_CHECKING:
    from training.loop import Trainer

logger = logging.getLogger(__name__)

UNSET: Any = object()


@dataclass
class Counters:
    """Where the run is (the next batch) and what it has done; saved in checkpoints."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    nonfinite_losses: int = 0
    images_seen: int = 0


@dataclass(frozen=True)
class ResumePoint:
    """The counters and RNG states at the start of an accumulation window."""

    counters: Counters
    rng: dict[str, Any]


class Checkpointer:
    """Training state and checkpoints of one trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._frozen_reference: Any = UNSET

    def point(self) -> ResumePoint:
        """The counters and RNG states now."""
        t = self.trainer
        rng = {
            "generator": t.generator.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        return ResumePoint(copy.copy(t.counters), rng)

    def trained_names(self) -> tuple[str, ...]:
        return tuple(t.model_name for t in self.trainer.trainings if t.model_name in TRAINABLE)

    def state(self, point: ResumePoint | None = None) -> TrainingState:
        """Everything needed to continue exactly from ``point`` (default: now)."""
        t = self.trainer
        point = self.point() if point is None else point
        c = point.counters
        components = {
            component.name: state
            for component in t.components
            if component.name and (state := component.state_dict()) is not None
        }
        return TrainingState(
            epoch=c.epoch,
            batch_in_epoch=c.batch_in_epoch,
            global_step=c.global_step,
            seed=t.run.seed,
            optimizers={m.model_name: m.optimizer.state_dict() for m in t.trainings},
            schedulers={m.model_name: m.scheduler.state_dict() for m in t.trainings},
            grad_scaler=t.scaler.state_dict() if t.scaler.is_enabled() else None,
            rng=point.rng,
            fingerprint=t.run.fingerprint(),
            counters={
                "nonfinite_losses": c.nonfinite_losses,
                "images_seen": c.images_seen,
                "grad_accum": t.grad_accum,
                "data_fingerprint": t.run.dataset.fingerprint(),
            },
            components=components,
            frozen_weights=self._frozen_weights(),
        )

    def restore(self, state: TrainingState) -> None:
        """Put the trainer where ``state`` says (weights are restored by the caller)."""
        t = self.trainer
        for training in t.trainings:
            training.optimizer.load_state_dict(state.optimizers[training.model_name])
            training.scheduler.load_state_dict(state.schedulers[training.model_name])
        if state.grad_scaler is not None and t.scaler.is_enabled():
            t.scaler.load_state_dict(state.grad_scaler)
        t.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch_cpu"])
        if state.rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.rng["cuda"])
        saved = state.counters
        t.counters = Counters(
            state.epoch,
            state.batch_in_epoch,
            state.global_step,
            int(saved.get("nonfinite_losses", 0)),
            int(saved.get("images_seen", 0)),
        )
        t.grad_accum = int(saved.get("grad_accum", t.grad_accum))
        for component in t.components:
            if component.name and component.name in state.components:
                component.load_state_dict(state.components[component.name])
        if saved.get("data_fingerprint") != t.run.dataset.fingerprint():
            logger.warning(
                "the training data or its settings changed since the checkpoint was saved: "
                "the run continues, but not with the batches it would have had"
            )
        logger.info(
            "resuming at epoch %d, batch %d, optimizer step %d",
            state.epoch + 1,
            state.batch_in_epoch,
            state.global_step,
        )

    def _frozen_weights(self) -> dict[str, Any] | None:
        """Where the exact weights of frozen, fp16-rounded models are (computed once)."""
        if self._frozen_reference is UNSET:
            t = self.trainer
            self._frozen_reference = None
            if not t.config.save_full_precision:
                self._frozen_reference = frozen_weights_reference(
                    t.models.bundle, self.trained_names(), t.run.base_model
                )
        return self._frozen_reference

    def save(
        self, kind: str, with_state: bool, point: ResumePoint | None = None, sync: bool = True
    ) -> Path | None:
        """Save a checkpoint (main process) at ``point`` (default: now); every process waits.

        ``kind``: one of `training.names.KINDS`; it prefixes the name. A name taken by another
        run's checkpoint gets a number. Returns the path (None in other processes).
        """
        t = self.trainer
        if sync:
            t.env.barrier()
        path = None
        if t.env.is_main_process:
            position = (point or self.point()).counters
            name = checkpoint_name(
                t.config.project_name,
                kind,
                position.epoch,
                position.global_step,
                t.config.no_prepend_last,
            )
            path = free_path(t.env.checkpoint_dir, name, self._is_ours)
            state = self.state(point) if with_state else None
            note = {
                "run": t.env.run_id,
                "kind": kind,
                "epoch": position.epoch,
                "global_step": position.global_step,
            }
            save_checkpoint(
                path,
                t.models.bundle,
                state,
                t.config.save_full_precision,
                self.trained_names(),
                note,
                single_file=not t.config.no_save_ckpt,
            )
            t.last_checkpoint = path
            for component in t.components:
                component.on_checkpoint(t, path, kind)
        if sync:
            t.env.barrier()
        return path

    def _is_ours(self, path: Path) -> bool:
        note = checkpoint_note(path)
        return note is not None and note.get("run") == self.trainer.env.run_id

    def save_after_crash(self, point: ResumePoint, stepping: bool) -> None:
        """A ``crashed-`` checkpoint at ``point`` after an unexpected error (main process),
        when the weights are finite; resumable unless the crash came inside an optimizer step
        (``stepping``: the models may be half-stepped)."""
        t = self.trainer
        if not t.env.is_main_process:
            return
        if not all(torch.isfinite(p).all() for m in t.trainings for p in m.parameters):
            logger.error("the weights are not finite: no crashed- checkpoint is written")
            return
        try:
            path = self.save("crashed", with_state=not stepping, point=point, sync=False)
        except Exception as error:
            logger.error("could not write a crashed- checkpoint: %s", error)
            return
        logger.error(
            "training crashed; %s checkpoint saved: %s", "a" if stepping else "a resumable", path
        )
