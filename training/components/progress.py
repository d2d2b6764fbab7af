"""The progress bar: one line over optimizer steps, at most 80 columns, logs printed above it."""

from __future__ import annotations

import time

from tqdm import tqdm

from training.components.base import Component, OptimizerStep
from training.context import TrainingContext

WIDTH = 80
# step counter, then [elapsed<remaining, epoch, loss, LR, speed]; the bar fills the rest
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
SMOOTHING = 0.1  # weight of the newest step in the images/s average
REDRAW_SECONDS = 0.5  # at most two redraws a second (tqdm's default is ten)


def rate_text(images_per_second: float) -> str:
    """Images/s with three significant digits, never rounded to 0.0 (0.0123, 4.56, 78.9, 1234)."""
    if images_per_second >= 100:
        return f"{images_per_second:.0f}"
    return f"{images_per_second:.3g}"


def postfix_text(
    epoch: int,
    max_epochs: int,
    loss: float | None,
    lr: float | None,
    images_per_second: float | None,
) -> str:
    """``ep 2/8 loss 0.1234 lr 1.0e-04 12.3 img/s``: what the bar shows after the counters."""
    parts = [f"ep {epoch + 1}/{max_epochs}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if images_per_second is not None and images_per_second > 0:
        parts.append(f"{rate_text(images_per_second)} img/s")
    return " ".join(parts)


class ProgressBar(Component):
    """A tqdm bar in the main process (the LR shown is the UNet's, else the text encoder's)."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._since = 0.0
        self._rate: float | None = None
        self._postfix_due = 0.0  # when the bar's text is next worth composing

    def on_training_start(self, ctx: TrainingContext) -> None:
        if not ctx.env.is_main_process:
            return
        self._bar = tqdm(
            total=ctx.total_optimizer_steps,
            initial=ctx.progress.global_step,
            unit="step",
            ncols=WIDTH,
            bar_format=BAR_FORMAT,
            dynamic_ncols=False,
            mininterval=REDRAW_SECONDS,
        )
        self._since = time.perf_counter()

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        if self._bar is None:
            return
        self._bar.total = ctx.total_optimizer_steps  # changes with grad_accum
        now = time.perf_counter()
        rate = step.images / max(now - self._since, 1e-9)
        self._since = now
        self._rate = rate if self._rate is None else SMOOTHING * rate + (1 - SMOOTHING) * self._rate
        last = step.global_step >= ctx.total_optimizer_steps
        if now >= self._postfix_due or last:  # the bar redraws at most this often
            self._postfix_due = now + REDRAW_SECONDS
            lr = next(iter(step.lrs.values()), None)
            text = postfix_text(step.epoch, ctx.config.max_epochs, step.loss, lr, self._rate)
            self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
