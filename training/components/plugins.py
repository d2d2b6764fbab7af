"""EveryDream2 plugins at the trainer's hooks, with EveryDream2's keyword arguments.

Training hooks run in the main process only (the data transforms run wherever data is loaded,
see `plugins.runner.PluginTransforms`). ``global_step`` is this trainer's optimizer step count
(EveryDream2 counts batches: the same with ``grad_accum`` 1). ``batch`` is a dict with
EveryDream2's keys (``image``: pixels in [-1, 1] or None with cached latents, ``tokens``,
``captions``, ``loss_scale``, ``runt_size``), ``ed_state`` an object with EveryDream2's
attribute names. ``arg_update_callback(key, value)`` changes a live setting (EveryDream2 knows
only ``grad_accum``; every key that may change during a run is accepted here) from the next
epoch, or from this one when called in ``on_epoch_start``; other keys are errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from config.errors import UserError
from data import Batch
from plugins.plugins import BasePlugin
from plugins.runner import PluginError, call
from training.components.base import Component
from training.components.ema import EMA
from training.context import TrainingContext


@dataclass
class EveryDreamState:
    """What EveryDream2 passes as ``ed_state``, under its names (``optimizer`` holds this
    trainer's per-model optimizers; ``unet_ema``/``text_encoder_ema`` are modules holding the
    EMA weights, None without EMA or for a model that does not train). SDXL's second encoder,
    its tokenizer and its EMA view are added under ``text_encoder_2``, ``tokenizer_2`` and
    ``text_encoder_2_ema`` (None for SD1.x/2.x)."""

    optimizer: Any
    train_batch: Any
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    vae: torch.nn.Module
    unet_ema: torch.nn.Module | None = None
    text_encoder_ema: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_2_ema: torch.nn.Module | None = None


class PluginHooks(Component):
    """Calls each plugin's hooks in the order train.json lists them."""

    def __init__(self, plugins: list[BasePlugin], ema: EMA | None = None) -> None:
        self.plugins = plugins
        self.ema = ema
        self._ema_modules: dict[str, torch.nn.Module] | None = None

    def _each(self, ctx: TrainingContext, hook: str, **kwargs: Any) -> None:
        if ctx.env.is_main_process:
            for plugin in self.plugins:
                call(plugin, hook, **kwargs)

    @staticmethod
    def _common(ctx: TrainingContext) -> dict[str, Any]:
        return {
            "global_step": ctx.progress.global_step,
            "project_name": ctx.config.project_name,
            "log_folder": str(ctx.env.run_folder or ""),
        }

    def on_training_start(self, ctx: TrainingContext) -> None:
        common = self._common(ctx)
        self._each(
            ctx,
            "on_training_start",
            log_folder=common["log_folder"],
            project_name=common["project_name"],
        )

    def on_epoch_start(self, ctx: TrainingContext, epoch: int) -> None:
        self._each(
            ctx,
            "on_epoch_start",
            epoch=epoch,
            epoch_length=ctx.batches_in_epoch(epoch),
            data_root=ctx.config.data_root,
            arg_update_callback=self._update_arg(ctx),
            **self._common(ctx),
        )

    def on_step_start(self, ctx: TrainingContext, batch: Batch) -> None:
        self._each(
            ctx,
            "on_step_start",
            epoch=batch.epoch,
            local_step=batch.index,
            batch=self._batch(ctx, batch),
            ed_state=self._state(ctx),
            **self._common(ctx),
        )

    def on_step_end(self, ctx: TrainingContext, batch: Batch, loss: float | None) -> None:
        self._each(
            ctx,
            "on_step_end",
            epoch=batch.epoch,
            local_step=batch.index,
            data_root=ctx.config.data_root,
            batch=self._batch(ctx, batch),
            ed_state=self._state(ctx),
            **self._common(ctx),
        )

    def on_epoch_end(self, ctx: TrainingContext, epoch: int) -> None:
        self._each(
            ctx,
            "on_epoch_end",
            epoch=epoch,
            data_root=ctx.config.data_root,
            arg_update_callback=self._update_arg(ctx),
            **self._common(ctx),
        )

    def on_training_end(self, ctx: TrainingContext, outcome: str) -> None:
        self._each(ctx, "on_training_end")

    @staticmethod
    def _update_arg(ctx: TrainingContext) -> Callable[[str, Any], None]:
        """EveryDream2's ``arg_update_callback``: a live setting changes at the next epoch."""

        def update(arg: str, value: Any) -> None:
            try:
                ctx.change_setting(arg, value, source="a plugin's arg_update_callback")
            except UserError as error:
                raise PluginError(f"arg_update_callback: {error}") from None

        return update

    @staticmethod
    def _batch(ctx: TrainingContext, batch: Batch) -> dict[str, Any]:
        return {
            "image": batch.pixel_values,
            "tokens": _first_tokenizers(ctx.models.tokens(list(batch.captions))),
            "captions": list(batch.captions),
            "loss_scale": torch.tensor(batch.loss_scales),
            "runt_size": 0,
        }

    def _state(self, ctx: TrainingContext) -> EveryDreamState:
        bundle = ctx.models.bundle
        if self._ema_modules is None and self.ema is not None and self.ema.weights is not None:
            self._ema_modules = self.ema.modules(ctx)
        views = self._ema_modules or {}
        return EveryDreamState(
            optimizer=dict(ctx.optimizers),
            train_batch=ctx.dataset,
            unet=bundle.unet,
            text_encoder=bundle.text_encoder,
            tokenizer=bundle.tokenizer,
            scheduler=ctx.models.noise_scheduler,
            vae=bundle.vae,
            unet_ema=views.get("unet"),
            text_encoder_ema=views.get("text_encoder"),
            text_encoder_2=bundle.text_encoder_2,
            tokenizer_2=bundle.tokenizer_2,
            text_encoder_2_ema=views.get("text_encoder_2"),
        )


def _first_tokenizers(ids: torch.Tensor) -> torch.Tensor:
    """EveryDream2's ``tokens`` (``[B, 77]``): SDXL's ids hold both tokenizers' rows
    (``[B, 2, 77]``); plugins get the first's, as for SD1.x/2.x."""
    return ids[:, 0] if ids.ndim == 3 else ids
