"""EveryDream2 plugins at the trainer's hooks, with EveryDream2's keyword arguments.

Training hooks run in the main process only (the data transforms run wherever data is loaded,
see `plugins.runner.PluginTransforms`). ``global_step`` is this trainer's optimizer step count
(EveryDream2 counts batches: the same with ``grad_accum`` 1). ``batch`` is a dict with
EveryDream2's keys (``image``: pixels in [-1, 1] or None with cached latents, ``tokens``,
``captions``, ``loss_scale``, ``runt_size``), ``ed_state`` an object with EveryDream2's
attribute names. ``arg_update_callback("grad_accum", n)`` changes the accumulation from the
next epoch (from this one when called in ``on_epoch_start``), like EveryDream2's; other
arguments are errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from data import Batch
from plugins.plugins import BasePlugin
from plugins.runner import PluginError, call
from training.components.base import Component
from training.distributed import broadcast_int

if TYPE_CHECKING:
    from training.loop import Trainer


@dataclass
class EveryDreamState:
    """What EveryDream2 passes as ``ed_state``, under its names (``optimizer`` holds this
    trainer's per-model optimizers; ``unet_ema``/``text_encoder_ema`` are the EMA copies)."""

    optimizer: Any
    train_batch: Any
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    vae: torch.nn.Module
    unet_ema: torch.nn.Module | None = None
    text_encoder_ema: torch.nn.Module | None = None


class PluginHooks(Component):
    """Calls each plugin's hooks in the order train.json lists them."""

    def __init__(self, plugins: list[BasePlugin]) -> None:
        self.plugins = plugins
        self._requested_accum: int | None = None

    def _each(self, trainer: Trainer, hook: str, **kwargs: Any) -> None:
        if trainer.env.is_main_process:
            for plugin in self.plugins:
                call(plugin, hook, **kwargs)

    def _common(self, trainer: Trainer) -> dict[str, Any]:
        return {
            "global_step": trainer.counters.global_step,
            "project_name": trainer.config.project_name,
            "log_folder": str(trainer.env.run_folder or ""),
        }

    def on_training_start(self, trainer: Trainer) -> None:
        common = self._common(trainer)
        self._each(
            trainer,
            "on_training_start",
            log_folder=common["log_folder"],
            project_name=common["project_name"],
        )

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._each(
            trainer,
            "on_epoch_start",
            epoch=epoch,
            epoch_length=trainer.batches_in_epoch(epoch),
            data_root=trainer.config.data_root,
            arg_update_callback=self._update_arg,
            **self._common(trainer),
        )
        self._apply_accum(trainer)

    def on_step_start(self, trainer: Trainer, batch: Batch) -> None:
        self._each(
            trainer,
            "on_step_start",
            epoch=batch.epoch,
            local_step=batch.index,
            batch=self._batch(trainer, batch),
            ed_state=self._state(trainer),
            **self._common(trainer),
        )

    def on_step_end(self, trainer: Trainer, batch: Batch, loss: float | None) -> None:
        self._each(
            trainer,
            "on_step_end",
            epoch=batch.epoch,
            local_step=batch.index,
            data_root=trainer.config.data_root,
            batch=self._batch(trainer, batch),
            ed_state=self._state(trainer),
            **self._common(trainer),
        )

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        self._each(
            trainer,
            "on_epoch_end",
            epoch=epoch,
            data_root=trainer.config.data_root,
            arg_update_callback=self._update_arg,
            **self._common(trainer),
        )
        self._apply_accum(trainer)

    def on_training_end(self, trainer: Trainer, outcome: str) -> None:
        self._each(trainer, "on_training_end")

    def _update_arg(self, arg: str, value: Any) -> None:
        """EveryDream2's ``arg_update_callback``: only ``grad_accum`` can be changed."""
        if arg != "grad_accum":
            raise PluginError(f"arg_update_callback: '{arg}' cannot be changed; only grad_accum")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PluginError(
                f"arg_update_callback: grad_accum must be a whole number >= 1, got {value!r}"
            )
        self._requested_accum = value

    def _apply_accum(self, trainer: Trainer) -> None:
        """A new grad_accum, the same in every process (the main one decides)."""
        wanted = self._requested_accum if self._requested_accum is not None else 0
        wanted = broadcast_int(wanted, trainer.env.device)
        self._requested_accum = None
        if wanted:
            trainer.grad_accum = wanted

    @staticmethod
    def _batch(trainer: Trainer, batch: Batch) -> dict[str, Any]:
        return {
            "image": batch.pixel_values,
            "tokens": trainer.models.tokens(list(batch.captions)),
            "captions": list(batch.captions),
            "loss_scale": torch.tensor(batch.loss_scales),
            "runt_size": 0,
        }

    @staticmethod
    def _state(trainer: Trainer) -> EveryDreamState:
        bundle = trainer.models.bundle
        return EveryDreamState(
            optimizer={t.model_name: t.optimizer for t in trainer.trainings},
            train_batch=trainer.run.dataset,
            unet=bundle.unet,
            text_encoder=bundle.text_encoder,
            tokenizer=bundle.tokenizer,
            scheduler=trainer.models.noise_scheduler,
            vae=bundle.vae,
        )
