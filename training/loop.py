"""The training loop: epochs of accumulation windows, optimizer steps, and components at hooks.

An epoch's batches are split into accumulation windows of ``grad_accum`` batches that start
afresh each epoch (the last one may be shorter); each batch's loss is divided by its window's
length, and the optimizers and schedulers step once per window. Everything else a run does
(progress, logging, samples, checkpoints, EMA, validation, plugins) is a `Component` called at
the loop's hooks (see `training.components.base`). The position (epoch, batch in epoch) always
names the next batch, so a checkpoint taken between windows continues exactly; the position and
RNG states at the start of the current window are kept, so that even a checkpoint saved after
a crash or a divergence mid-window is an exact resume point.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data import Batch
from training.checkpoint import (
    TRAINABLE,
    checkpoint_note,
    frozen_weights_reference,
    save_checkpoint,
)
from training.components.base import Component, OptimizerStep
from training.distributed import any_process
from training.environment import Environment
from training.interrupt import StopRequest
from training.names import checkpoint_name, free_path
from training.precision import make_grad_scaler, tweak_grad_scaler
from training.run import Run
from training.state import TrainingState
from training.step import StepModels, batch_loss

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 10
UNSET: Any = object()


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses in a row: the run stops with a checkpoint of good weights."""


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a component to end the run at once, without a checkpoint (benchmarks)."""


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


@dataclass
class _Window:
    """The accumulation window in progress."""

    losses: list[float] = field(default_factory=list)
    images: int = 0
    skipped: bool = False  # a non-finite loss: the window's optimizer step is skipped


class Trainer:
    """Runs the loop of a built run; components do the rest (the main process logs and saves)."""

    def __init__(
        self, run: Run, models: StepModels, env: Environment, components: Sequence[Component]
    ) -> None:
        self.run = run
        self.config = run.train.config  # replaced between epochs when settings are reloaded
        self.models = models
        self.env = env
        self.components = list(components)
        self.trainings = run.trainings
        self.grad_accum = self.config.grad_accum
        self.counters = Counters()
        self.scaler = make_grad_scaler(env.precision)
        self.generator = torch.Generator(device=env.device).manual_seed(run.seed)
        self.last_captions: list[str] = []
        self.last_checkpoint: Path | None = None
        self._window = _Window()
        self._consecutive_nonfinite = 0
        self._steps_this_session = 0
        self._stepping = False
        self._resume_point = self._current_point()
        self._frozen_reference: Any = UNSET

    # --- the loop ---------------------------------------------------------------------------

    def train(self, stop: StopRequest) -> str:
        """Train to the end or until ``stop.requested``; returns "finished" or "interrupted"."""
        try:
            self._call("on_training_start")
            outcome = "interrupted" if self._run(stop) else "finished"
            self._call("on_training_end", outcome)
            self.save("last" if outcome == "finished" else "interrupted", with_state=True)
            return outcome
        except StopTraining:
            raise
        except TrainingDivergedError:
            self.save("diverged", with_state=True, point=self._resume_point)
            raise
        except Exception:
            self._save_after_crash()
            raise
        finally:
            for component in self.components:
                component.close()

    def _run(self, stop: StopRequest) -> bool:
        """Every remaining batch; True when a stop was requested."""
        c = self.counters
        source = self.env.source
        for batch in source.batches(c.epoch, c.batch_in_epoch, self.config.max_epochs):
            assert (batch.epoch, batch.step) == (c.epoch, c.batch_in_epoch), "loader disagrees"
            epoch = c.epoch
            if c.batch_in_epoch == 0:
                self._call("on_epoch_start", epoch)
            self._call("on_step_start", batch)
            length, last = self._window_of(c.batch_in_epoch, self.steps_in_epoch(epoch))
            with self._gradient_sync(last):
                loss = self._micro_step(batch, length)
            c.batch_in_epoch += 1
            if c.batch_in_epoch == self.steps_in_epoch(epoch):
                c.epoch, c.batch_in_epoch = epoch + 1, 0
            if last:
                self._call("on_optimizer_step", self._optimizer_step(epoch))
            self._call("on_step_end", batch, loss)
            if c.batch_in_epoch == 0:
                self._call("on_epoch_end", epoch)
            if last and any_process(stop.requested, self.env.device):
                return True
        return False

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches in ``epoch`` for this process (epochs of a rated dataset differ)."""
        return self.run.dataset.steps_in_epoch(epoch)

    def _window_of(self, index: int, batches: int) -> tuple[int, bool]:
        """(length of the window that batch ``index`` is in, whether it is its last batch)."""
        start = index - index % self.grad_accum
        length = min(self.grad_accum, batches - start)
        return length, index == start + length - 1

    def _gradient_sync(self, last_in_window: bool) -> contextlib.AbstractContextManager:
        """Several processes all-reduce gradients only on a window's last batch."""
        stack = contextlib.ExitStack()
        if not last_in_window:
            for module in (self.models.unet, self.models.prompt_encoder):
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def _micro_step(self, batch: Batch, window_length: int) -> float | None:
        """Forward and backward of one batch; None when it is skipped."""
        if self._window.skipped:  # every process agreed: no step for this window
            return None
        env = self.env
        latents = env.source.latents(batch)
        loss = batch_loss(
            self.models, latents, batch, self.config, self.generator, env.precision, env.shard
        )
        value = loss.detach().item()
        if any_process(not math.isfinite(value), env.device):
            self._nonfinite(batch)
            return None
        self._consecutive_nonfinite = 0
        self.last_captions = list(batch.captions)
        self.scaler.scale(loss / window_length).backward()
        self._window.losses.append(value)
        self._window.images += len(batch) * env.shard.world_size
        return value

    def _nonfinite(self, batch: Batch) -> None:
        """Count a non-finite loss; its whole window is skipped (in every process)."""
        self.counters.nonfinite_losses += 1
        self._consecutive_nonfinite += 1
        self._window.skipped = True
        logger.warning(
            "non-finite loss at epoch %d batch %d (%s): this optimizer step is skipped",
            batch.epoch + 1, batch.step, ", ".join(batch.paths),
        )  # fmt: skip
        if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDivergedError(
                f"{self._consecutive_nonfinite} non-finite losses in a row: training diverged. "
                "The last good weights are saved; lower lr, set clip_grad_norm, or try "
                "mixed_precision 'no'"
            )

    def _optimizer_step(self, epoch: int) -> OptimizerStep:
        window, self._window = self._window, _Window()
        stepped = bool(window.losses) and not window.skipped
        measure = self.run.optim.log_grad_norm and (
            (self.counters.global_step + 1) % self.config.log_step == 0
        )
        norms: dict[str, float] = {}
        self._stepping = True
        if stepped:
            for training in self.trainings:
                self.scaler.unscale_(training.optimizer)
                norm = self._clip(training.parameters, measure)
                if norm is not None:
                    norms[training.model_name] = norm
            for training in self.trainings:
                self.scaler.step(training.optimizer)
            self.scaler.update()
        for training in self.trainings:
            training.optimizer.zero_grad(set_to_none=True)
            training.scheduler.step()
        self._stepping = False
        self.counters.global_step += 1
        self.counters.images_seen += window.images
        self._steps_this_session += 1
        if self.run.optim.apply_grad_scaler_step_tweaks:
            tweak_grad_scaler(self.scaler, self.counters.global_step)
        self._resume_point = self._current_point()
        loss = sum(window.losses) / len(window.losses) if window.losses else None
        lrs = {t.model_name: t.scheduler.get_last_lr()[0] for t in self.trainings}
        return OptimizerStep(
            self.counters.global_step, epoch, loss, window.images, stepped, lrs, norms
        )

    def _clip(self, parameters: list[torch.nn.Parameter], measure: bool) -> float | None:
        with_grad = [p for p in parameters if p.grad is not None]
        if self.config.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.config.clip_grad_norm)
            return float(norm) if measure else None
        if measure:
            return float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
        return None

    def _call(self, hook: str, *args: Any) -> None:
        for component in self.components:
            getattr(component, hook)(self, *args)

    # --- state ------------------------------------------------------------------------------

    def _current_point(self) -> ResumePoint:
        rng = {
            "generator": self.generator.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        return ResumePoint(copy.copy(self.counters), rng)

    def training_state(self, point: ResumePoint | None = None) -> TrainingState:
        """Everything needed to continue exactly from ``point`` (default: here)."""
        point = self._current_point() if point is None else point
        c = point.counters
        components = {
            component.name: state
            for component in self.components
            if component.name and (state := component.state_dict()) is not None
        }
        return TrainingState(
            epoch=c.epoch,
            batch_in_epoch=c.batch_in_epoch,
            global_step=c.global_step,
            seed=self.run.seed,
            optimizers={t.model_name: t.optimizer.state_dict() for t in self.trainings},
            schedulers={t.model_name: t.scheduler.state_dict() for t in self.trainings},
            grad_scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            rng=point.rng,
            fingerprint=self.run.fingerprint(),
            counters={
                "nonfinite_losses": c.nonfinite_losses,
                "images_seen": c.images_seen,
                "grad_accum": self.grad_accum,
                "data_fingerprint": self.run.dataset.fingerprint(),
            },
            components=components,
            frozen_weights=self._frozen_weights(),
        )

    def restore(self, state: TrainingState) -> None:
        """Continue from a checkpoint's training state (weights are restored by the caller)."""
        for training in self.trainings:
            training.optimizer.load_state_dict(state.optimizers[training.model_name])
            training.scheduler.load_state_dict(state.schedulers[training.model_name])
        if state.grad_scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state.grad_scaler)
        self.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch_cpu"])
        if state.rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.rng["cuda"])
        saved = state.counters
        self.counters = Counters(
            state.epoch, state.batch_in_epoch, state.global_step,
            int(saved.get("nonfinite_losses", 0)), int(saved.get("images_seen", 0)),
        )  # fmt: skip
        self.grad_accum = int(saved.get("grad_accum", self.grad_accum))
        for component in self.components:
            if component.name and component.name in state.components:
                component.load_state_dict(state.components[component.name])
        self._resume_point = self._current_point()
        if saved.get("data_fingerprint") != self.run.dataset.fingerprint():
            logger.warning(
                "the training data or its settings changed since the checkpoint was saved: "
                "the run continues, but not with the batches it would have had"
            )
        logger.info(
            "resuming at epoch %d, batch %d, optimizer step %d",
            state.epoch + 1, state.batch_in_epoch, state.global_step,
        )  # fmt: skip

    def _frozen_weights(self) -> dict[str, Any] | None:
        """Where the exact weights of frozen, fp16-rounded models are (computed once)."""
        if self._frozen_reference is UNSET:
            self._frozen_reference = None
            if not self.config.save_full_precision:
                self._frozen_reference = frozen_weights_reference(
                    self.models.bundle, self.trained_names(), self.run.base_model
                )
        return self._frozen_reference

    def trained_names(self) -> tuple[str, ...]:
        return tuple(t.model_name for t in self.trainings if t.model_name in TRAINABLE)

    # --- checkpoints ------------------------------------------------------------------------

    def save(
        self, kind: str, with_state: bool, point: ResumePoint | None = None, sync: bool = True
    ) -> Path | None:
        """Save a checkpoint (main process) at ``point`` (default: here); every process waits.

        ``kind``: one of `training.names.KINDS`; it prefixes the name. A name taken by another
        run's checkpoint gets a number. Returns the path (None in other processes).
        """
        if sync:
            self.env.barrier()
        path = None
        if self.env.is_main_process:
            position = (point or self._current_point()).counters
            name = checkpoint_name(
                self.config.project_name, kind, position.epoch, position.global_step,
                self.config.no_prepend_last,
            )  # fmt: skip
            path = free_path(self.env.checkpoint_dir, name, self._is_ours)
            state = self.training_state(point) if with_state else None
            note = {"run": self.env.run_id, "kind": kind, "epoch": position.epoch,
                    "global_step": position.global_step}  # fmt: skip
            save_checkpoint(
                path, self.models.bundle, state, self.config.save_full_precision,
                self.trained_names(), note, single_file=not self.config.no_save_ckpt,
            )  # fmt: skip
            self.last_checkpoint = path
            self._call("on_checkpoint", path, kind)
        if sync:
            self.env.barrier()
        return path

    def _is_ours(self, path: Path) -> bool:
        note = checkpoint_note(path)
        return note is not None and note.get("run") == self.env.run_id

    def _save_after_crash(self) -> None:
        """A resumable ``crashed-`` checkpoint after an unexpected error, when it makes sense."""
        if self._steps_this_session == 0 or not self.env.is_main_process:
            return
        finite = all(torch.isfinite(p).all() for t in self.trainings for p in t.parameters)
        if not finite:
            logger.error("the weights are not finite: no crashed- checkpoint is written")
            return
        stepping = self._stepping  # a crash inside an optimizer step: no exact resume point
        try:
            path = self.save("crashed", with_state=not stepping, point=self._resume_point,
                             sync=False)  # fmt: skip
        except Exception as error:
            logger.error("could not write a crashed- checkpoint: %s", error)
            return
        logger.error(
            "training crashed; %s checkpoint saved: %s",
            "a" if stepping else "a resumable", path,
        )  # fmt: skip
