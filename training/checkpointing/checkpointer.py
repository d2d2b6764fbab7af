"""The trainer's side of checkpoints: its training state, restoring it, and saving.

A `Checkpointer` is given what a run's training state is made of (optimizers, schedulers, the
grad scaler, the generator, the components' states) when it is built; the trainer hands it the
position (`ResumePoint`) to save or restore. It names and writes checkpoints (main process) and
saves a ``crashed-`` checkpoint after an unexpected error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from config.live import LiveSettings
from optimizer.registry import keeping_implementation
from optimizer.schedule_free import evaluation_weights
from training.checkpointing.names import checkpoint_name, claim_path, claimed_by
from training.checkpointing.options import SaveOptions
from training.checkpointing.state import TrainingState
from training.checkpointing.writer import (
    TRAINABLE,
    checkpoint_note,
    frozen_weights_reference,
    save_checkpoint,
)
from training.context import Counters, LoopState, SettingChange
from training.environment import Environment
from training.fsdp import Gathered
from training.run import Run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """The counters, RNG states and live settings at the start of an accumulation window
    (``pending``: changes asked for mid-epoch, applied at the epoch's end)."""

    counters: Counters
    rng: dict[str, Any]
    settings: LiveSettings
    configured: LiveSettings
    pending: dict[str, SettingChange]


@dataclass(frozen=True)
class Resumables:
    """The parts of a run that change as it trains, besides the weights and the counters."""

    scaler: torch.amp.GradScaler
    generator: torch.Generator
    component_states: Callable[[], dict[str, Any]]


class Checkpointer:
    """Training state and checkpoints of one run."""

    def __init__(self, run: Run, env: Environment, resumables: Resumables) -> None:
        self.run = run
        self.env = env
        self.resumables = resumables
        self._frozen_digests: dict[str, Any] | None = None  # computed at the first fp16 save
        self._cuda = torch.cuda.is_available()  # asked once: it takes microseconds each step

    def point(self, state: LoopState, pending: dict[str, SettingChange]) -> ResumePoint:
        """A resume point where ``state`` is, with the RNG states now."""
        rng = {
            "generator": self.resumables.generator.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if self._cuda else None,
        }
        return ResumePoint(state.counters, rng, state.settings, state.configured, dict(pending))

    def trained_names(self) -> tuple[str, ...]:
        return tuple(t.model_name for t in self.run.trainings if t.model_name in TRAINABLE)

    def state(
        self,
        point: ResumePoint,
        full_precision: bool,
        optimizers: dict[str, dict[str, Any]] | None = None,
    ) -> TrainingState:
        """Everything needed to continue exactly from ``point`` (``optimizers``: their states
        gathered whole, for sharded models)."""
        run, c = self.run, point.counters
        scaler = self.resumables.scaler
        if optimizers is None:
            optimizers = {m.model_name: m.optimizer.state_dict() for m in run.trainings}
        return TrainingState(
            epoch=c.epoch,
            batch_in_epoch=c.batch_in_epoch,
            global_step=c.global_step,
            seed=run.seed,
            optimizers=optimizers,
            schedulers={m.model_name: m.scheduler.state_dict() for m in run.trainings},
            grad_scaler=scaler.state_dict() if scaler.is_enabled() else None,
            rng=point.rng,
            fingerprint=run.fingerprint(),
            counters={
                "nonfinite_losses": c.nonfinite_losses,
                "images_seen": c.images_seen,
                "data_fingerprint": run.dataset.fingerprint(),
                "processes": run.dataset.settings.world_size,
                "batch_size": run.dataset.settings.batch_size,
                "schedule_grad_accum": run.length.schedule_grad_accum,
                "live_settings": point.settings.as_dict(),
                "configured_settings": point.configured.as_dict(),
                "pending_settings": {k: asdict(v) for k, v in point.pending.items()},
            },
            components=self.resumables.component_states(),
            frozen_weights=None if full_precision or run.lora else self._frozen_weights(),
        )

    def restore(self, state: TrainingState) -> Counters:
        """Optimizers, schedulers, grad scaler and RNG states as ``state`` says; returns its
        counters (weights are restored by the caller, live settings by `training.live`)."""
        sharding = self.env.sharding
        for training in self.run.trainings:
            saved = state.optimizers[training.model_name]
            with keeping_implementation(training.optimizer):
                if sharding is None:
                    training.optimizer.load_state_dict(saved)
                else:
                    sharding.load_optimizer_state(training, saved)
            training.scheduler.load_state_dict(state.schedulers[training.model_name])
        scaler = self.resumables.scaler
        if state.grad_scaler is not None and scaler.is_enabled():
            scaler.load_state_dict(state.grad_scaler)
        self.resumables.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch_cpu"])
        if state.rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.rng["cuda"])
        saved = state.counters
        _report_processes(saved, self.run.dataset.settings.world_size, self.run.dataset.group_size)
        if saved.get("data_fingerprint") != self.run.dataset.fingerprint():
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
        return Counters(
            state.epoch,
            state.batch_in_epoch,
            state.global_step,
            int(saved.get("nonfinite_losses", 0)),
            int(saved.get("images_seen", 0)),
        )

    def _frozen_weights(self) -> dict[str, Any] | None:
        """Where the exact weights of frozen, fp16-rounded models are (digests computed once:
        frozen weights never change)."""
        if self._frozen_digests is None:
            reference = frozen_weights_reference(
                self.run.models, self.trained_names(), self.run.base_model
            )
            self._frozen_digests = {"reference": reference}
        return self._frozen_digests["reference"]

    def save(
        self,
        kind: str,
        point: ResumePoint,
        with_state: bool,
        sync: bool = True,
    ) -> Path | None:
        """Save a checkpoint (main process) at ``point``; every process waits.

        ``kind``: one of `training.checkpointing.names.KINDS`; it prefixes the name. A name
        taken by another run's checkpoint gets a number. The live settings of ``point`` say
        whether the weights are fp32 and whether a single file is written. Returns the path
        (None in other processes).
        """
        if sync:
            self.env.barrier()
        path = None
        gathered = self._gather(with_state)
        if self.env.is_main_process:
            path = self._write(kind, point, with_state, gathered)
        if sync:
            self.env.barrier()
        return path

    def _gather(self, with_state: bool) -> Gathered | None:
        """Sharded models gathered whole (every process takes part; None: not sharded): the
        optimizer states as they train, the weights as they are saved (evaluation weights)."""
        sharding = self.env.sharding
        if sharding is None:
            return None
        optimizers = sharding.gather_optimizers() if with_state else {}
        with evaluation_weights(t.optimizer for t in self.run.trainings):
            bundle = sharding.gather_models(self.env.is_main_process)
        return Gathered(bundle, optimizers)

    def _write(
        self, kind: str, point: ResumePoint, with_state: bool, gathered: Gathered | None
    ) -> Path:
        config, position = self.run.train.config, point.counters
        settings = point.settings
        name = checkpoint_name(
            config.project_name,
            kind,
            position.epoch,
            position.global_step,
            config.no_prepend_last,
        )
        path = claim_path(self.env.checkpoint_dir, name, self.env.run_id, self._is_ours)
        optimizers = None if gathered is None else gathered.optimizers
        state = self.state(point, settings.save_full_precision, optimizers) if with_state else None
        note = {
            "run": self.env.run_id,
            "kind": kind,
            "epoch": position.epoch,
            "global_step": position.global_step,
        }
        options = SaveOptions(
            full_precision=settings.save_full_precision,
            single_file=not settings.no_save_ckpt,
            note=note,
            lora=self.run.lora,
        )
        if gathered is not None:
            assert gathered.bundle is not None, "the main process holds the gathered models"
            return save_checkpoint(path, gathered.bundle, state, options)
        with evaluation_weights(t.optimizer for t in self.run.trainings):
            return save_checkpoint(path, self.run.models, state, options)

    def _is_ours(self, path: Path) -> bool:
        note = checkpoint_note(path)
        if note is None:
            return claimed_by(path) == self.env.run_id
        return note.get("run") == self.env.run_id

    def save_after_crash(self, point: ResumePoint, stepping: bool) -> Path | None:
        """A ``crashed-`` checkpoint at ``point`` after an unexpected error (main process),
        when the weights are finite; resumable unless the crash came inside an optimizer step
        (``stepping``: the models may be half-stepped)."""
        if not self.env.is_main_process:
            return None
        if self.env.sharding is not None:
            logger.error(
                "training crashed; under FSDP no crashed- checkpoint is written (the other "
                "processes' shards cannot be gathered after a crash): resume from the last "
                "checkpoint"
            )
            return None
        if not all(torch.isfinite(p).all() for m in self.run.trainings for p in m.parameters):
            logger.error("the weights are not finite: no crashed- checkpoint is written")
            return None
        try:
            path = self.save("crashed", point, with_state=not stepping, sync=False)
        except Exception as error:
            logger.error("could not write a crashed- checkpoint: %s", error)
            return None
        logger.error(
            "training crashed; %s checkpoint saved: %s", "a" if stepping else "a resumable", path
        )
        return path


def _report_processes(saved: dict[str, Any], processes: int, global_batch: int) -> None:
    """Say what resuming on another number of processes (or another batch) changes."""
    before, batch = saved.get("processes"), saved.get("batch_size")
    if not isinstance(before, int) or not isinstance(batch, int):
        return  # a checkpoint from before these were recorded
    if before * batch == global_batch:
        if before != processes:
            logger.info(
                "the checkpoint was written by %d process(es) x batch %d, this run has %d x "
                "batch %d: the same global batch of %d, so the same images in the same order "
                "with the same random draws (to float rounding: the all-reduce's sums change)",
                before,
                batch,
                processes,
                global_batch // processes,
                global_batch,
            )
        return
    logger.warning(
        "the global batch changes from %d (%d process(es) x batch %d) to %d: the epochs are "
        "planned anew (other batches, other optimizer steps per epoch, a resume that does not "
        "follow the saved run); the LR schedule keeps the length planned at the run's start",
        before * batch,
        before,
        batch,
        global_batch,
    )
