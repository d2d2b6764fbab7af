"""The training loop: epochs of accumulation windows, optimizer steps, and components at hooks.

An epoch's batches are split into accumulation windows of ``grad_accum`` batches that start
afresh each epoch (the last one may be shorter); each batch's loss is divided by its window's
length, and the optimizers and schedulers step once per window. Everything else a run does
(progress, logging, samples, checkpoints, EMA, validation, plugins) is a `Component` called at
the loop's hooks with the run's `TrainingContext` (see `training.components.base`). Components
ask for checkpoints and setting changes through the context; the trainer carries them out.

The position (epoch, batch in epoch) always names the next batch, so a checkpoint taken between
windows continues exactly; the position, RNG states and settings at the start of the current
window are kept, so that even a checkpoint saved after a crash or a divergence mid-window is an
exact resume point. Live settings change only at epoch boundaries (`training.live`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from data import Batch
from optimizer.build import ModelTraining
from optimizer.fused import FusedBackward
from training.checkpointing.checkpointer import Checkpointer, Resumables, ResumePoint
from training.checkpointing.state import TrainingState
from training.components.base import Component, Hooks, OptimizerStep, SavedCheckpoint
from training.context import Commands, Counters, LoopState, TrainingContext
from training.distributed import any_process
from training.environment import Environment
from training.interrupt import StopRequest
from training.live import LiveUpdates
from training.precision import make_grad_scaler, tweak_grad_scaler
from training.run import Run
from training.step import StepModels, batch_loss

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 10


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses in a row: the run stops with a checkpoint of good weights."""


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a component to end the run at once, without a checkpoint (benchmarks)."""


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
        self.models = models
        self.env = env
        self.hooks = Hooks(components)
        self.trainings = tuple(run.trainings)  # the optimizers that step (fixed for the run)
        self.scaler = make_grad_scaler(env.precision)
        self.generator = torch.Generator(device=env.device).manual_seed(run.seed)
        self.commands = Commands()
        self.live = LiveUpdates(run, env)
        self.state: LoopState = self.live.start()
        self.context = TrainingContext(
            config=run.train.config,
            env=env,
            models=models,
            dataset=run.dataset,
            optimizers={t.model_name: t.optimizer for t in self.trainings},
            state=self.state,
            commands=self.commands,
        )
        resumables = Resumables(self.scaler, self.generator, self.hooks.states)
        self.checkpoints = Checkpointer(run, env, resumables)
        self._window = _Window()
        self._consecutive_nonfinite = 0
        self._steps_this_session = 0
        self._stepping = False
        self._resume_point = self._point()

    # --- the loop ---------------------------------------------------------------------------

    def train(self, stop: StopRequest) -> str:
        """Train to the end or until ``stop.requested``; returns "finished" or "interrupted"."""
        try:
            self.hooks.training_start(self.context)
            outcome = self._train_batches(stop)
            self.hooks.training_end(self.context, outcome)
            self.save("last" if outcome == "finished" else "interrupted", with_state=True)
            return outcome
        except StopTraining:
            raise
        except TrainingDivergedError:
            self.save("diverged", with_state=True, point=self._resume_point)
            raise
        except Exception:
            if self._steps_this_session > 0:
                self._save_after_crash()
            raise
        finally:
            self.hooks.close()

    def _train_batches(self, stop: StopRequest) -> str:
        """Every remaining batch: "interrupted" when a stop was requested, else "finished"."""
        max_epochs = self.run.train.config.max_epochs
        if self.state.counters.batch_in_epoch == 0 and self.state.counters.epoch < max_epochs:
            self._start_epoch()
        for batch in self._batches():
            c = self.state.counters
            assert (batch.epoch, batch.index) == (c.epoch, c.batch_in_epoch), "loader disagrees"
            epoch, last = self._train_batch(batch)
            ended = self.state.counters.batch_in_epoch == 0
            if ended:
                self.hooks.epoch_end(self.context, epoch)
                self._apply_settings()
                self._carry_out_checkpoints()
            if last and any_process(stop.requested, self.env.device):
                return "interrupted"
            if ended and self.state.counters.epoch < max_epochs:
                self._start_epoch()
        return "finished"

    def _batches(self) -> Iterator[Batch]:
        """The run's remaining batches. When grad_accum changes and the data's plan depends on
        it (batch ids), the batches are planned again from the new epoch's start."""
        max_epochs = self.run.train.config.max_epochs
        replans = self.run.dataset.plan_uses_grad_accum
        while (c := self.state.counters).epoch < max_epochs:
            accum = self.state.settings.grad_accum
            source = self.env.source.batches(c.epoch, c.batch_in_epoch, max_epochs, accum)
            for batch in source:
                yield batch
                new_epoch = self.state.counters.batch_in_epoch == 0
                if replans and new_epoch and self.state.settings.grad_accum != accum:
                    break
            else:
                return

    def _start_epoch(self) -> None:
        """The hooks of an epoch's start, then the setting changes they asked for, before the
        epoch's first batch is read."""
        self.hooks.epoch_start(self.context, self.state.counters.epoch)
        self._apply_settings()

    def _apply_settings(self) -> None:
        """The setting changes components asked for (at an epoch boundary)."""
        self.live.apply(self.state, self.commands.take_settings())
        self._resume_point = self._point()

    def _train_batch(self, batch: Batch) -> tuple[int, bool]:
        """Forward and backward of one batch, the optimizer step when it ends a window, and
        their hooks; returns (the batch's epoch, whether it ended a window)."""
        c = self.state.counters
        epoch = c.epoch
        self.hooks.step_start(self.context, batch)
        length, last = self._window_of(c.batch_in_epoch, self.run.dataset.batches_in_epoch(epoch))
        with self._gradient_sync(last):
            loss = self._micro_step(batch, length)
        c = self.state.counters  # the step may have counted a non-finite loss
        if c.batch_in_epoch + 1 == self.run.dataset.batches_in_epoch(epoch):
            self.state.counters = replace(c, epoch=epoch + 1, batch_in_epoch=0)
        else:
            self.state.counters = replace(c, batch_in_epoch=c.batch_in_epoch + 1)
        if last:
            self.hooks.optimizer_step(self.context, self._optimizer_step(epoch, batch.index))
            self._carry_out_checkpoints()
        self.hooks.step_end(self.context, batch, loss)
        return epoch, last

    def _window_of(self, index: int, batches: int) -> tuple[int, bool]:
        """(length of the window that batch ``index`` is in, whether it is its last batch)."""
        accum = self.state.settings.grad_accum
        start = index - index % accum
        length = min(accum, batches - start)
        return length, index == start + length - 1

    def _gradient_sync(self, last_in_window: bool) -> contextlib.AbstractContextManager:
        """Several processes all-reduce gradients only on a window's last batch; a fused
        backward pass steps the parameters in that batch's backward."""
        stack = contextlib.ExitStack()
        if last_in_window:
            for training in self.trainings:
                if isinstance(training.optimizer, FusedBackward):
                    stack.enter_context(training.optimizer.armed())
        else:
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
            self.models,
            latents,
            batch,
            self.state.settings,
            self.generator,
            env.precision,
            env.shard,
        )
        value = loss.detach().item()
        if any_process(not math.isfinite(value), env.device):
            self._nonfinite(batch)
            return None
        self._consecutive_nonfinite = 0
        self.state.last_captions = batch.captions
        if window_length > 1:  # (dividing by 1 would only add a node to the graph)
            loss = loss / window_length
        self.scaler.scale(loss).backward()
        self._window.losses.append(value)
        self._window.images += len(batch) * env.shard.world_size
        return value

    def _nonfinite(self, batch: Batch) -> None:
        """Count a non-finite loss; its whole window is skipped (in every process)."""
        c = self.state.counters
        self.state.counters = replace(c, nonfinite_losses=c.nonfinite_losses + 1)
        self._consecutive_nonfinite += 1
        self._window.skipped = True
        logger.warning(
            "non-finite loss at epoch %d batch %d (%s): this optimizer step is skipped",
            batch.epoch + 1,
            batch.index,
            ", ".join(batch.paths),
        )
        if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDivergedError(
                f"{self._consecutive_nonfinite} non-finite losses in a row: training diverged. "
                "The last good weights are saved; lower lr, set clip_grad_norm, or try "
                "mixed_precision 'no'"
            )

    def _optimizer_step(self, epoch: int, last_index: int) -> OptimizerStep:
        window, self._window = self._window, _Window()
        stepped = bool(window.losses) and not window.skipped
        settings = self.state.settings
        measure = self.run.optim.log_grad_norm and (
            (self.state.counters.global_step + 1) % settings.log_step == 0
        )
        self._stepping = True
        norms = self._step_optimizers(measure) if stepped else {}
        for training in self.trainings:
            training.optimizer.zero_grad(set_to_none=True)
            training.scheduler.step()
        self._stepping = False
        c = self.state.counters
        self.state.counters = replace(
            c, global_step=c.global_step + 1, images_seen=c.images_seen + window.images
        )
        self._steps_this_session += 1
        if self.run.optim.apply_grad_scaler_step_tweaks:
            tweak_grad_scaler(self.scaler, self.state.counters.global_step)
        self._resume_point = self._point()
        accum = settings.grad_accum
        return OptimizerStep(
            global_step=self.state.counters.global_step,
            epoch=epoch,
            window=last_index // accum,
            windows_in_epoch=-(-self.run.dataset.batches_in_epoch(epoch) // accum),
            loss=sum(window.losses) / len(window.losses) if window.losses else None,
            images=window.images,
            stepped=stepped,
            lrs={t.model_name: t.scheduler.get_last_lr()[0] for t in self.trainings},
            grad_norms=norms,
            grad_scale=self.scaler.get_scale() if self.scaler.is_enabled() else None,
        )

    def _step_optimizers(self, measure: bool) -> dict[str, float]:
        """Unscale, clip (and measure) each model's gradients, step; the norms measured."""
        norms: dict[str, float] = {}
        for training in self.trainings:
            self.scaler.unscale_(training.optimizer)
            norm = self._clip(training, measure)
            if norm is not None:
                norms[training.model_name] = norm
        for training in self.trainings:
            self.scaler.step(training.optimizer)
        self.scaler.update()
        return norms

    def _clip(self, training: ModelTraining, measure: bool) -> float | None:
        limit = self.state.settings.clip_grad_norm
        if limit is None and not measure:
            return None
        with_grad = [p for p in training.parameters if p.grad is not None]
        if not with_grad:  # a fused backward pass stepped and freed them already
            return None
        if limit is not None:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, limit)
            return float(norm) if measure else None
        if measure:
            return float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
        return None

    # --- checkpoints (see training.checkpointing) ------------------------------------------

    def _point(self) -> ResumePoint:
        return self.checkpoints.point(self.state, self.commands.settings)

    def _carry_out_checkpoints(self) -> None:
        """The checkpoints components asked for at this point."""
        for kind, with_state in self.commands.take_checkpoints():
            self.save(kind, with_state)

    def save(
        self, kind: str, with_state: bool, point: ResumePoint | None = None, sync: bool = True
    ) -> Path | None:
        """Save a checkpoint of ``kind`` at ``point`` (default: now; main process writes, every
        process waits), then call the components' ``on_checkpoint``."""
        point = self._point() if point is None else point
        path = self.checkpoints.save(kind, point, with_state, sync)
        if path is not None:
            self.state.last_checkpoint = path
            self.hooks.checkpoint(self.context, SavedCheckpoint(path, kind))
        return path

    def _save_after_crash(self) -> None:
        path = self.checkpoints.save_after_crash(self._resume_point, self._stepping)
        if path is not None:
            self.state.last_checkpoint = path
            self.hooks.checkpoint(self.context, SavedCheckpoint(path, "crashed"))

    def restore(self, state: TrainingState) -> None:
        """Continue from a checkpoint's training state (weights are restored by the caller)."""
        counters = self.checkpoints.restore(state)
        self.hooks.load_states(state.components)
        self.live.resume(self.state, state, counters, self.commands)
        self._resume_point = self._point()

    @property
    def counters(self) -> Counters:
        """Where the run is (read-only)."""
        return self.state.counters
