"""Validation passes (``validation_config``): before the first step, then at the cadence.

A pass evaluates every set (`training.validation.sets`) with fixed noise and logs EveryDream2's
TensorBoard tags: ``loss/val``, ``loss/<name>`` for each extra dataset, ``loss/train-stabilized``,
and ``loss/_all_val_combined`` (the mean of the validation sets, when there are several). A
whole ``every_n_epochs`` validates after every n-th epoch; a fraction below 1 validates several
times per epoch, between optimizer steps, at steps that depend only on the epoch's length.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from config.validation_config import COMBINED_NAME
from data.masks import MaskLoader
from optimizer.schedule_free import evaluation_weights
from training.components.base import Component, OptimizerStep
from training.context import TrainingContext
from training.validation.cadence import validates_after_epoch, validation_step_indices
from training.validation.evaluate import Evaluator
from training.validation.sets import STABILIZE, ValidationData

logger = logging.getLogger(__name__)

# EveryDream2's trend warning: after more than 2 × 5 + 1 passes, when the last 5 rise on average.
TREND_WINDOW = 5
TREND_MIN_PASSES = 2 * TREND_WINDOW + 1


class Validation(Component):
    """Evaluates the validation sets and logs their losses (every process computes)."""

    name = "validation"

    def __init__(self, data: ValidationData) -> None:
        self.data = data
        self.settings = data.settings
        self._evaluator: Evaluator | None = None
        self._references: dict[str, float] = {}  # first value of each tag (use_relative_loss)
        self._history: dict[str, list[float]] = {}  # recent values (the trend warning)

    def on_training_start(self, ctx: TrainingContext) -> None:
        env = ctx.env
        self._evaluator = Evaluator(
            ctx.models,
            ctx.config.clip_skip,
            env.precision,
            env.device,
            env.shard,
            show_progress=env.is_main_process,
            masks=MaskLoader() if ctx.config.masked_loss else None,
            equal_passes=env.sharding is not None,
        )
        if ctx.config.cache_latents:
            self._evaluator.cache_latents(self.data.sets, ctx.config.latent_cache_dir)
        if ctx.progress.global_step == 0:  # once per run: not again after a resume
            self.validate(ctx)

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        every = self.settings.every_n_epochs
        if every < 1 and step.window in validation_step_indices(every, step.windows_in_epoch):
            self.validate(ctx)

    def on_epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        if validates_after_epoch(self.settings.every_n_epochs, epoch):
            self.validate(ctx)

    def validate(self, ctx: TrainingContext) -> dict[str, float]:
        """One pass over every set with the step settings in force; returns the logged values
        by tag."""
        assert self._evaluator is not None, "on_training_start builds the evaluator"
        started = time.perf_counter()
        settings = ctx.settings
        with evaluation_weights(ctx.optimizers.values()):
            losses = {s.name: self._evaluator.loss(s, settings) for s in self.data.sets}
        validation = [losses[s.name] for s in self.data.sets if s.kind != STABILIZE]
        if len(validation) > 1:
            losses[COMBINED_NAME] = sum(validation) / len(validation)
        logged: dict[str, float] = {}
        for name, loss in losses.items():
            if self.settings.use_relative_loss:
                loss -= self._references.setdefault(name, loss)
            logged[f"loss/{name}"] = loss
        step = ctx.progress.global_step
        metrics = ctx.env.metrics
        if metrics is not None:
            metrics.scalars(logged, step)
            metrics.flush()
        seconds = time.perf_counter() - started
        if ctx.env.is_main_process:
            values = ", ".join(f"{tag} {value:.5f}" for tag, value in logged.items())
            logger.info("validation at step %d: %s (%.1f s)", step, values, seconds)
            self._warn_on_rising_loss(losses)
        return logged

    def _warn_on_rising_loss(self, losses: dict[str, float]) -> None:
        """EveryDream2's warning when a validation loss trends upwards (not for stabilized)."""
        for eval_set in self.data.sets:
            if eval_set.kind == STABILIZE:
                continue
            history = self._history.setdefault(eval_set.name, [])
            history.append(losses[eval_set.name])
            del history[: -(TREND_MIN_PASSES + 1)]
            if len(history) <= TREND_MIN_PASSES:
                continue
            if np.average(np.diff(history[-TREND_WINDOW:])) > 0:
                logger.warning(
                    "validation loss of %s is rising: check the loss/%s graph (overfitting?)",
                    eval_set.name,
                    eval_set.name,
                )

    def close(self) -> None:
        self._evaluator = None  # releases latent caches

    def state_dict(self) -> dict[str, Any] | None:
        return {"references": dict(self._references), "history": dict(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._references = {str(k): float(v) for k, v in state.get("references", {}).items()}
        history = state.get("history", {})
        self._history = {str(k): [float(v) for v in values] for k, values in history.items()}

    def describe(self) -> dict[str, Any] | None:
        return self.data.describe()
