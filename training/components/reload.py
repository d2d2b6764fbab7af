"""``load_settings_every_epoch``: read train.json again before each epoch, as EveryDream2 does.

The live keys (`config.live.LIVE_KEYS`) that the file changes take effect from that epoch on; a
change to any other key is logged as ignored until the next run (the data plan, models and
optimizers are built once). Flags typed on the command line still win over the file. A file
that no longer reads or validates is reported and the settings in force are kept: an edit never
stops a run. A change is compared with what the file said before, so a value a plugin set stays
until the file itself changes that key. The main process reads the file; every process applies
what it read.
"""

from __future__ import annotations

import dataclasses
import logging

from config.cli import CommandLine
from config.errors import UserError
from config.live import LIVE_KEYS, LiveSettings
from config.load import CLI_SOURCE, LoadedTrainConfig, load_train_config
from config.train_config import TrainConfig
from training.components.base import Component
from training.context import TrainingContext

logger = logging.getLogger(__name__)

# Resolved at start-up (findlast, the random seed): the file's words differ from the values.
NOT_COMPARED = ("resume_ckpt", "seed", "load_settings_every_epoch")


class SettingsReloader(Component):
    """Before every epoch but the one a session starts with, train.json's live keys again."""

    def __init__(self, loaded: LoadedTrainConfig) -> None:
        self.loaded = loaded
        self._session_start: tuple[int, int] | None = None

    def on_training_start(self, ctx: TrainingContext) -> None:
        self._session_start = (ctx.progress.epoch, ctx.progress.batch_in_epoch)

    def on_epoch_start(self, ctx: TrainingContext, epoch: int) -> None:
        if (epoch, 0) == self._session_start or not ctx.env.is_main_process:
            return  # the settings were read a moment ago / the main process reads for all
        fresh = self._read()
        if fresh is None:
            return
        ignored = [
            f.name
            for f in dataclasses.fields(fresh)
            if f.name not in LIVE_KEYS + NOT_COMPARED
            and getattr(fresh, f.name) != getattr(self.loaded.config, f.name)
        ]
        if ignored:
            logger.warning(
                "%s: %s changed; only %s can change during a run (the rest applies to the next)",
                self.loaded.path,
                ", ".join(ignored),
                ", ".join(LIVE_KEYS),
            )
        changes = ctx.configured_settings.differences(LiveSettings.of(fresh))
        for key, value in changes.items():
            ctx.change_setting(key, value, source=str(self.loaded.path), configured=True)

    def _read(self) -> TrainConfig | None:
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
