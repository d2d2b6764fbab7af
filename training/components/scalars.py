"""Training scalars every ``log_step`` optimizer steps and at each epoch's end.

Each value is written under this trainer's tag and, where EveryDream2 has one, under
EveryDream2's tag too, so dashboards of either kind keep working.
"""

from __future__ import annotations

import time

import torch

from training.components.base import Component, OptimizerStep
from training.context import TrainingContext

# this trainer's tag -> EveryDream2's tag for the same value
EVERYDREAM2_TAGS = {
    "loss/train": "loss/log_step",
    "lr/unet": "hyperparameter/lr unet",
    "lr/text_encoder": "hyperparameter/lr text encoder",
    "grad_scale": "hyperparameter/grad scale",
    "performance/images_per_second": "performance/images per second",
}
MIB = 2**20


class TrainingScalars(Component):
    """Loss, learning rates, gradient norms, speed, memory (main process only)."""

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._images = 0
        self._since = 0.0
        self._epoch_losses: list[float] = []
        self._epoch_started = 0.0

    def on_training_start(self, ctx: TrainingContext) -> None:
        self._since = self._epoch_started = time.perf_counter()

    def on_epoch_start(self, ctx: TrainingContext, epoch: int) -> None:
        self._epoch_losses = []
        self._epoch_started = time.perf_counter()

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        metrics = ctx.env.metrics
        if metrics is None:
            return
        if step.loss is not None:
            self._losses.append(step.loss)
            self._epoch_losses.append(step.loss)
        self._images += step.images
        if step.global_step % ctx.settings.log_step != 0 or not self._losses:
            return
        now = time.perf_counter()
        values = {
            "loss/train": sum(self._losses) / len(self._losses),
            "performance/images_per_second": self._images / max(now - self._since, 1e-9),
            "epoch": step.epoch + 1,
            "nonfinite_losses": ctx.progress.nonfinite_losses,
        }
        values |= {f"lr/{name}": lr for name, lr in step.lrs.items()}
        values |= {f"grad_norm/{name}": norm for name, norm in step.grad_norms.items()}
        if step.grad_scale is not None:
            values["grad_scale"] = step.grad_scale
        if ctx.env.device.type == "cuda":
            values["performance/vram"] = torch.cuda.memory_reserved(ctx.env.device) / MIB
        for tag, value in list(values.items()):
            if tag in EVERYDREAM2_TAGS:
                values[EVERYDREAM2_TAGS[tag]] = value
        metrics.scalars(values, step.global_step)
        self._losses, self._images, self._since = [], 0, now

    def on_epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        metrics = ctx.env.metrics
        if metrics is None:
            return
        step = ctx.progress.global_step
        minutes = (time.perf_counter() - self._epoch_started) / 60
        values = {"performance/minutes per epoch": minutes}
        if self._epoch_losses:
            values["loss/epoch"] = sum(self._epoch_losses) / len(self._epoch_losses)
        metrics.scalars(values, step)
