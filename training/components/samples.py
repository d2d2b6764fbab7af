"""Sample images during training, as the ``sample_prompts`` file and ``sample_steps`` say."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from optimizer.schedule_free import evaluation_weights
from training.components.base import Component, OptimizerStep
from training.components.ema import EMA
from training.context import TrainingContext
from training.samples import SampleBatch, SampleSettings, SamplingModel, generate_samples


class Samples(Component):
    """Before training (when asked), every n optimizer steps and every n epochs.

    With an ``ema``, samples are drawn with the weights it names (the EMA's are named
    ``..._ema.png`` and tagged ``samples/N_ema``, as EveryDream2 tags them).
    """

    def __init__(self, settings: SampleSettings, ema: EMA | None = None) -> None:
        self.settings = settings
        self.ema = ema

    def every_n_steps(self, ctx: TrainingContext) -> int:
        file_value = self.settings.every_n_steps
        return ctx.settings.sample_steps if file_value is None else file_value

    def on_training_start(self, ctx: TrainingContext) -> None:
        if self.settings.pretrain and ctx.progress.global_step == 0:
            self.make(ctx)

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        if step.global_step % self.every_n_steps(ctx) == 0:
            self.make(ctx)

    def on_epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        every = self.settings.every_n_epochs
        if every is not None and (epoch + 1) % every == 0:
            self.make(ctx)

    def make(self, ctx: TrainingContext) -> list[Path]:
        """Sample images with the model as it is now (main process; the others wait, or with
        sharded models draw the same passes without writing)."""
        paths: list[Path] = []
        env = ctx.env
        writes = env.is_main_process and env.run_folder is not None
        if writes or env.sharding is not None:
            model = SamplingModel(
                bundle=ctx.models.bundle,
                device=env.device,
                clip_skip=ctx.config.clip_skip,
                noise_scheduler_config=ctx.models.noise_scheduler.config,
                autocast=env.precision.autocast,
            )
            on_image = None if env.metrics is None else env.metrics.image
            for suffix, weights in self._weights():
                batch = SampleBatch(
                    requests=list(self.settings.requests),
                    out_dir=None if env.run_folder is None else env.run_folder / "samples",
                    step=ctx.progress.global_step,
                    scheduler_name=self.settings.scheduler,
                    captions=ctx.last_captions,
                    name_suffix=suffix,
                    show_progress_bars=self.settings.show_progress_bars,
                )
                with evaluation_weights(ctx.optimizers.values()), weights:
                    paths += generate_samples(model, batch, on_image)
            if env.metrics is not None:
                env.metrics.flush()
        env.barrier()
        return paths

    def _weights(self) -> list[tuple[str, contextlib.AbstractContextManager[Any]]]:
        if self.ema is None:
            return [("", contextlib.nullcontext())]
        return self.ema.sample_weights()

    def describe(self) -> dict[str, Any] | None:
        return {"images": len(self.settings.requests), "scheduler": self.settings.scheduler}
