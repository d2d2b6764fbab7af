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
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data import Batch
from training.checkpointing import Checkpointer, Counters, ResumePoint
from training.components.base import Component, OptimizerStep
from training.distributed import any_process
from training.environment import Environment
from training.interrupt import StopRequest
from training.precision import make_grad_scaler, tweak_grad_scaler
from training.run import Run
from training.state import TrainingState
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
        self.checkpoints = Checkpointer(self)
        self._window = _Window()
        self._consecutive_nonfinite = 0
        self._steps_this_session = 0
        self._stepping = False
        self._resume_point = self.checkpoints.point()

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
            if self._steps_this_session > 0:
                self.checkpoints.save_after_crash(self._resume_point, self._stepping)
            raise
        finally:
            for component in self.components:
                component.close()

    def _run(self, stop: StopRequest) -> bool:
        """Every remaining batch; True when a stop was requested."""
        c = self.counters
        source = self.env.source
        for batch in source.batches(c.epoch, c.batch_in_epoch, self.config.max_epochs):
            assert (batch.epoch, batch.index) == (c.epoch, c.batch_in_epoch), "loader disagrees"
            epoch = c.epoch
            if c.batch_in_epoch == 0:
                self._call("on_epoch_start", epoch)
            self._call("on_step_start", batch)
            length, last = self._window_of(c.batch_in_epoch, self.batches_in_epoch(epoch))
            with self._gradient_sync(last):
                loss = self._micro_step(batch, length)
            c.batch_in_epoch += 1
            if c.batch_in_epoch == self.batches_in_epoch(epoch):
                c.epoch, c.batch_in_epoch = epoch + 1, 0
            if last:
                self._call("on_optimizer_step", self._optimizer_step(epoch))
            self._call("on_step_end", batch, loss)
            if c.batch_in_epoch == 0:
                self._call("on_epoch_end", epoch)
            if last and any_process(stop.requested, self.env.device):
                return True
        return False

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches in ``epoch`` for this process (epochs of a rated dataset differ)."""
        return self.run.dataset.batches_in_epoch(epoch)

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
        self._resume_point = self.checkpoints.point()
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

    # --- checkpoints (see training.checkpointing) ------------------------------------------

    def save(
        self, kind: str, with_state: bool, point: ResumePoint | None = None, sync: bool = True
    ) -> Path | None:
        """Save a checkpoint of ``kind`` (main process); see `Checkpointer.save`."""
        return self.checkpoints.save(kind, with_state, point, sync)

    def restore(self, state: TrainingState) -> None:
        """Continue from a checkpoint's training state (weights are restored by the caller)."""
        self.checkpoints.restore(state)
        self._resume_point = self.checkpoints.point()
