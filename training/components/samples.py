"""Sample images during training, as the ``sample_prompts`` file and ``sample_steps`` say."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.components.base import Component, OptimizerStep
from training.samples import SampleSettings, generate_samples

if TYPE_CHECKING:
    from training.components.ema import EMA
    from training.loop import Trainer


class _MetricsImages:
    """What `generate_samples` writes images to, forwarded to the run's metrics."""

    def __init__(self, trainer: Trainer) -> None:
        self.metrics = trainer.env.metrics

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str = "HWC") -> None:
        if self.metrics is not None:
            self.metrics.image(tag, image, step)

    def flush(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()


class Samples(Component):
    """Before training (when asked), every n optimizer steps and every n epochs.

    With an ``ema``, samples are drawn with the weights it names (the EMA's are named
    ``..._ema.png`` and tagged ``samples/N_ema``, as EveryDream2 tags them).
    """

    def __init__(self, settings: SampleSettings, ema: EMA | None = None) -> None:
        self.settings = settings
        self.ema = ema

    def every_n_steps(self, trainer: Trainer) -> int:
        file_value = self.settings.every_n_steps
        return trainer.config.sample_steps if file_value is None else file_value

    def on_training_start(self, trainer: Trainer) -> None:
        if self.settings.pretrain and trainer.counters.global_step == 0:
            self.make(trainer)

    def on_optimizer_step(self, trainer: Trainer, step: OptimizerStep) -> None:
        if step.global_step % self.every_n_steps(trainer) == 0:
            self.make(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every = self.settings.every_n_epochs
        if every is not None and (epoch + 1) % every == 0:
            self.make(trainer)

    def make(self, trainer: Trainer) -> list[Path]:
        """Sample images with the model as it is now (main process; the others wait)."""
        paths: list[Path] = []
        env = trainer.env
        if env.is_main_process and env.run_folder is not None:
            for suffix, weights in self._weights():
                with weights:
                    paths += generate_samples(
                        trainer.models.bundle,
                        list(self.settings.requests),
                        trainer.config.clip_skip,
                        env.device,
                        env.run_folder / "samples",
                        trainer.counters.global_step,
                        writer=_MetricsImages(trainer),
                        scheduler_name=self.settings.scheduler,
                        captions=trainer.last_captions,
                        show_progress_bars=self.settings.show_progress_bars,
                        noise_scheduler_config=trainer.models.noise_scheduler.config,
                        autocast=env.precision.autocast,
                        name_suffix=suffix,
                    )
        env.barrier()
        return paths

    def _weights(self) -> list[tuple[str, contextlib.AbstractContextManager[Any]]]:
        if self.ema is None:
            return [("", contextlib.nullcontext())]
        return self.ema.sample_weights()

    def describe(self) -> dict[str, Any] | None:
        return {"images": len(self.settings.requests), "scheduler": self.settings.scheduler}
