"""The training loop: epochs of accumulation windows, optimizer steps, and what happens after.

An epoch's batches are split into accumulation windows of ``grad_accum`` batches that start
afresh each epoch (the last one may be shorter); each micro-batch's loss is divided by its
window's length, and the optimizers and schedulers step once per window. Checkpoints are
taken only between windows, so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data import TrainDataset, make_loader
from optimizer.build import ModelTraining
from training.checkpoint import TrainingState, save_checkpoint
from training.distributed import any_process
from training.interrupt import StopRequest
from training.latent_cache import LatentCache, cached_batches
from training.outputs import Progress
from training.precision import Precision, make_grad_scaler, tweak_grad_scaler
from training.samples import SampleSettings, generate_samples
from training.step import (
    LatentDistribution,
    Shard,
    StepModels,
    StepSettings,
    batch_loss,
    encode_latent_distribution,
)

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 10


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses in a row: the run stops with a checkpoint of good weights."""


@dataclass(frozen=True)
class LoopSettings:
    """The train.json keys that drive the loop (same names)."""

    max_epochs: int
    grad_accum: int
    clip_grad_norm: float | None
    log_step: int
    sample_steps: int
    save_every_n_epochs: int | None
    ckpt_every_n_minutes: float | None
    save_ckpts_from_n_epochs: int
    save_optimizer: bool
    save_full_precision: bool
    no_prepend_last: bool
    no_save_ckpt: bool
    project_name: str
    clip_skip: int
    apply_grad_scaler_step_tweaks: bool
    log_grad_norm: bool


@dataclass
class Counters:
    """Where the run is; saved in and restored from checkpoints."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    nonfinite_losses: int = 0
    images_seen: int = 0


class Trainer:
    """Runs the loop for a built run; the main process also logs, samples and saves."""

    def __init__(
        self,
        *,
        dataset: TrainDataset,
        models: StepModels,
        trainings: list[ModelTraining],
        step_settings: StepSettings,
        settings: LoopSettings,
        precision: Precision,
        device: torch.device,
        shard: Shard,
        seed: int,
        checkpoint_dir: Path,
        progress: Progress,
        samples: SampleSettings | None,
        sample_dir: Path | None,
        is_main_process: bool,
        fingerprint: dict[str, Any],
        latent_source: LatentCache | None = None,
        barrier: Callable[[], None] | None = None,
        schedule_dir: Path | None = None,
        on_optimizer_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.models = models
        self.trainings = trainings
        self.step_settings = step_settings
        self.settings = settings
        self.precision = precision
        self.device = device
        self.shard = shard
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.samples = samples
        self.sample_dir = sample_dir
        self.is_main_process = is_main_process
        self.fingerprint = fingerprint
        self.latent_source = latent_source
        self.barrier = barrier if barrier is not None else (lambda: None)
        self.schedule_dir = schedule_dir
        self.on_optimizer_step = on_optimizer_step
        self.counters = Counters()
        self.scaler = make_grad_scaler(precision)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._consecutive_nonfinite = 0
        self._window_has_grad = False
        self._last_save = time.monotonic()
        self._last_captions: list[str] = []
        self.last_checkpoint: Path | None = None

    # --- state ------------------------------------------------------------------------------

    def training_state(self) -> TrainingState:
        """Everything needed to continue exactly from here."""
        return TrainingState(
            epoch=self.counters.epoch,
            batch_in_epoch=self.counters.batch_in_epoch,
            global_step=self.counters.global_step,
            seed=self.seed,
            optimizers={t.model_name: t.optimizer.state_dict() for t in self.trainings},
            schedulers={t.model_name: t.scheduler.state_dict() for t in self.trainings},
            grad_scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            rng={
                "generator": self.generator.get_state(),
                "torch_cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            fingerprint=self.fingerprint,
            counters={
                "nonfinite_losses": self.counters.nonfinite_losses,
                "images_seen": self.counters.images_seen,
                "data_fingerprint": self.dataset.fingerprint(),
            },
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
        self.counters = Counters(
            epoch=state.epoch,
            batch_in_epoch=state.batch_in_epoch,
            global_step=state.global_step,
            nonfinite_losses=int(state.counters.get("nonfinite_losses", 0)),
            images_seen=int(state.counters.get("images_seen", 0)),
        )
        if state.counters.get("data_fingerprint") != self.dataset.fingerprint():
            logger.warning(
                "the training data or its settings changed since the checkpoint was saved: "
                "the run continues, but not with the batches it would have had"
            )
        logger.info(
            "resuming at epoch %d, batch %d, optimizer step %d",
            state.epoch + 1, state.batch_in_epoch, state.global_step,
        )  # fmt: skip

    # --- the loop ---------------------------------------------------------------------------

    def train(self, stop: StopRequest) -> bool:
        """Train to the end, or until ``stop.requested``; returns True when interrupted."""
        try:
            if (
                self.samples is not None
                and self.samples.pretrain
                and self.counters.global_step == 0
            ):
                self.make_samples()
            if self._run(stop):
                self.save("interrupted", with_state=True)
                return True
            self.save("last", with_state=True)
            return False
        except TrainingDivergedError:
            self.save("diverged", with_state=True)
            raise
        finally:
            self.progress.close()

    def _batches(self) -> Iterable[dict[str, Any]]:
        """Every remaining batch of the run, from one loader (its workers start once)."""
        epoch, start = self.counters.epoch, self.counters.batch_in_epoch
        end = self.settings.max_epochs
        if self.latent_source is not None:
            return cached_batches(self.dataset, epoch, start, end)
        pin = self.device.type == "cuda"
        return make_loader(self.dataset, epoch, start, pin_memory=pin, end_epoch=end)

    def _run(self, stop: StopRequest) -> bool:
        """Every remaining batch; True when a stop was requested."""
        batches = self.dataset.steps_per_epoch()
        accum = self.settings.grad_accum
        for batch in self._batches():
            assert batch["epoch"] == self.counters.epoch, "loader and counters disagree"
            index = self.counters.batch_in_epoch
            if index == 0:
                self._before_epoch()
            window_start = index - index % accum
            window_length = min(accum, batches - window_start)
            last_in_window = index == window_start + window_length - 1
            with self._gradient_sync(last_in_window):
                self._micro_step(batch, window_length)
            self.counters.batch_in_epoch += 1
            stopping = False
            if last_in_window:
                self._optimizer_step()
                stopping = any_process(stop.requested, self.device)
            if self.counters.batch_in_epoch == batches:
                self.counters.epoch += 1
                self.counters.batch_in_epoch = 0
                self._after_epoch()
            if stopping:
                return True
        return False

    def _before_epoch(self) -> None:
        if self.schedule_dir is not None:
            epoch = self.counters.epoch
            self.dataset.write_schedule(
                epoch, self.schedule_dir / f"schedule-ep{epoch + 1:03d}.txt"
            )

    def _gradient_sync(self, last_in_window: bool) -> contextlib.AbstractContextManager:
        """Several processes all-reduce gradients only on a window's last micro-batch."""
        stack = contextlib.ExitStack()
        if not last_in_window:
            for module in (self.models.unet, self.models.prompt_encoder):
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def _latents(self, batch: dict[str, Any]) -> LatentDistribution:
        if self.latent_source is not None:
            return self.latent_source(batch)
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        return encode_latent_distribution(self.models.bundle, pixels, self.precision)

    def _micro_step(self, batch: dict[str, Any], window_length: int) -> None:
        loss = batch_loss(
            self.models, self._latents(batch), batch["captions"], self.step_settings,
            self.generator, self.precision, self.shard,
        )  # fmt: skip
        value = loss.detach().item()
        if any_process(not math.isfinite(value), self.device):
            self._nonfinite(batch)
            return
        self._consecutive_nonfinite = 0
        self._last_captions = batch["captions"]
        self.scaler.scale(loss / window_length).backward()
        self._window_has_grad = True
        images = len(batch["captions"]) * self.shard.world_size
        self.counters.images_seen += images
        self.progress.micro_batch(value, images)

    def _nonfinite(self, batch: dict[str, Any]) -> None:
        self.counters.nonfinite_losses += 1
        self._consecutive_nonfinite += 1
        logger.warning(
            "non-finite loss at epoch %d batch %d (%s): batch skipped",
            self.counters.epoch + 1, self.counters.batch_in_epoch, ", ".join(batch["paths"]),
        )  # fmt: skip
        if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDivergedError(
                f"{self._consecutive_nonfinite} non-finite losses in a row: training diverged. "
                "The last good weights are saved; lower lr, set clip_grad_norm, or try "
                "disable_amp"
            )

    def _optimizer_step(self) -> None:
        step = self.counters.global_step
        grad_norms: dict[str, float] = {}
        if self._window_has_grad:
            log_norm = self.settings.log_grad_norm and (step + 1) % self.settings.log_step == 0
            for training in self.trainings:
                self.scaler.unscale_(training.optimizer)
                norm = self._clip(training, log_norm)
                if norm is not None:
                    grad_norms[f"grad_norm/{training.model_name}"] = norm
            for training in self.trainings:
                self.scaler.step(training.optimizer)
            self.scaler.update()
        for training in self.trainings:
            training.optimizer.zero_grad(set_to_none=True)
            training.scheduler.step()
        self._window_has_grad = False
        self.counters.global_step += 1
        if self.settings.apply_grad_scaler_step_tweaks:
            tweak_grad_scaler(self.scaler, self.counters.global_step)
        self._after_optimizer_step(grad_norms)
        if self.on_optimizer_step is not None:
            self.on_optimizer_step(self)

    def _clip(self, training: ModelTraining, want_norm: bool) -> float | None:
        parameters = [p for p in training.parameters if p.grad is not None]
        if self.settings.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, self.settings.clip_grad_norm)
            return float(norm) if want_norm else None
        if want_norm:
            return float(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
        return None

    # --- after a step or an epoch -----------------------------------------------------------

    def _after_optimizer_step(self, grad_norms: dict[str, float]) -> None:
        step = self.counters.global_step
        lrs = {t.model_name: t.scheduler.get_last_lr()[0] for t in self.trainings}
        scalars = dict(grad_norms)
        scalars["nonfinite_losses"] = float(self.counters.nonfinite_losses)
        if self.scaler.is_enabled():
            scalars["grad_scale"] = float(self.scaler.get_scale())
        self.progress.optimizer_step(step, self.counters.epoch, lrs, scalars)
        if self.samples is not None and step % self._sample_every_n_steps() == 0:
            self.make_samples()
        minutes = self.settings.ckpt_every_n_minutes
        if minutes and time.monotonic() - self._last_save >= minutes * 60 and self._may_save():
            self.save("periodic", with_state=self.settings.save_optimizer)

    def _sample_every_n_steps(self) -> int:
        assert self.samples is not None
        file_value = self.samples.every_n_steps
        return self.settings.sample_steps if file_value is None else file_value

    def _after_epoch(self) -> None:
        every = self.settings.save_every_n_epochs
        epochs_done = self.counters.epoch
        sample_epochs = None if self.samples is None else self.samples.every_n_epochs
        if sample_epochs is not None and epochs_done % sample_epochs == 0:
            self.make_samples()
        if (
            every
            and epochs_done % every == 0
            and epochs_done < self.settings.max_epochs
            and self._may_save()
        ):
            self.save("periodic", with_state=self.settings.save_optimizer)

    def _may_save(self) -> bool:
        return self.counters.epoch >= self.settings.save_ckpts_from_n_epochs

    def make_samples(self) -> None:
        """Sample images with the model as it is now (main process only)."""
        assert self.samples is not None
        if self.is_main_process and self.sample_dir is not None:
            generate_samples(
                self.models.bundle, list(self.samples.requests), self.settings.clip_skip,
                self.device, self.sample_dir, self.counters.global_step,
                writer=self.progress.writer, scheduler_name=self.samples.scheduler,
                captions=self._last_captions,
                show_progress_bars=self.samples.show_progress_bars,
            )  # fmt: skip
        self.barrier()

    def checkpoint_name(self, kind: str) -> str:
        c = self.counters
        name = f"{self.settings.project_name}-ep{c.epoch:02d}-gs{c.global_step:05d}"
        if kind == "last" and not self.settings.no_prepend_last:
            return f"last-{name}"
        if kind in ("interrupted", "diverged"):
            return f"{kind}-{name}"
        return name

    def save(self, kind: str, with_state: bool) -> None:
        """Save a checkpoint (main process), atomically; every process waits for it."""
        self.barrier()
        path = self.checkpoint_dir / self.checkpoint_name(kind)
        if self.is_main_process:
            trained = tuple(t.model_name for t in self.trainings)
            state = self.training_state() if with_state else None
            save_checkpoint(
                path, self.models.bundle, state, self.settings.save_full_precision, trained,
                single_file=not self.settings.no_save_ckpt,
            )  # fmt: skip
            logger.info("saved checkpoint %s%s", path, " (resumable)" if with_state else "")
        self.last_checkpoint = path
        self._last_save = time.monotonic()
        self.barrier()
