"""``load_settings_every_epoch``: read train.json again before each epoch, as EveryDream2 does.

Keys that the loop reads as it goes change from that epoch on (`LIVE_KEYS`); a change to any
other key is logged as ignored until the next run (the data plan, models and optimizers are
built once). Flags typed on the command line still win over the file. A file that no longer
reads or validates is reported and the settings in force are kept: an edit never stops a run.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from config.cli import CommandLine
from config.errors import UserError
from config.load import CLI_SOURCE, LoadedTrainConfig, load_train_config
from training.components.base import Component

if TYPE_CHECKING:
    from training.loop import Trainer

logger = logging.getLogger(__name__)

LIVE_KEYS = (
    "grad_accum",
    "clip_grad_norm",
    "zero_frequency_noise_ratio",
    "pyramid_noise_discount",
    "timestep_start",
    "timestep_end",
    "loss_type",
    "min_snr_gamma",
    "embedding_perturbation",
    "log_step",
    "sample_steps",
    "save_every_n_epochs",
    "ckpt_every_n_minutes",
    "save_ckpts_from_n_epochs",
    "save_optimizer",
    "save_full_precision",
    "no_save_ckpt",
)
# Resolved at start-up (findlast, the random seed): the file's words differ from the values.
NOT_COMPARED = ("resume_ckpt", "seed", "load_settings_every_epoch")


class SettingsReloader(Component):
    """Before every epoch after the first of a session, train.json's live keys again."""

    def __init__(self, loaded: LoadedTrainConfig) -> None:
        self.loaded = loaded
        self._first = True

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self._first:  # the settings were read a moment ago
            self._first = False
            return
        fresh = self._read()
        if fresh is None:
            return
        current = trainer.config
        changes = {
            k: getattr(fresh, k) for k in LIVE_KEYS if getattr(fresh, k) != getattr(current, k)
        }
        ignored = [
            f.name
            for f in dataclasses.fields(current)
            if f.name not in LIVE_KEYS + NOT_COMPARED
            and getattr(fresh, f.name) != getattr(current, f.name)
        ]
        if ignored:
            logger.warning(
                "%s: %s changed; only %s can change during a run (the rest applies to the next)",
                self.loaded.path,
                ", ".join(ignored),
                ", ".join(LIVE_KEYS),
            )
        if changes:
            logger.info(
                "epoch %d: settings from %s: %s",
                epoch + 1,
                self.loaded.path,
                ", ".join(f"{k}={v!r}" for k, v in changes.items()),
            )
            trainer.config = dataclasses.replace(current, **changes)
            if "grad_accum" in changes:
                trainer.grad_accum = changes["grad_accum"]

    def _read(self) -> Any:
        """The file's settings with the typed flags over them; None (and a warning) when the
        file cannot be used now."""
        typed = {
            k: getattr(self.loaded.config, k)
            for k, source in self.loaded.sources.items()
            if source == CLI_SOURCE
        }
        try:
            return load_train_config(CommandLine(self.loaded.path, False, typed)).config
        except UserError as error:
            logger.warning(
                "%s cannot be read again (%s); the settings in force are kept",
                self.loaded.path,
                str(error).replace("\n", " "),
            )
            return None
