"""What components see of a run, and what they may ask of the trainer.

A component's hooks receive a `TrainingContext`: a read-only view of the run (where it is, the
settings in force, the environment, the models, the data, the optimizers, what it has written)
and a small command surface (`request_checkpoint`, `change_setting`). Components never assign
to the trainer: the trainer owns `LoopState` and carries commands out between hooks, so every
change goes through one place (and reaches every process the same way).

A context is built from plain parts, so a test can make one without a trainer.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from config.live import LiveSettings, check_live_value
from config.train_config import TrainConfig
from data import TrainDataset
from training.environment import Environment
from training.step import StepModels


@dataclass(frozen=True)
class Counters:
    """Where the run is (the next batch) and what it has done; saved in checkpoints."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    nonfinite_losses: int = 0
    images_seen: int = 0


@dataclass
class LoopState:
    """The trainer's changing state that components read (through the context only).

    ``settings`` are the live settings in force; ``configured`` what train.json and the
    command line last said of them (a plugin's change differs from it until the file changes).
    """

    counters: Counters
    settings: LiveSettings
    configured: LiveSettings
    total_optimizer_steps: int
    last_captions: tuple[str, ...] = ()
    last_checkpoint: Path | None = None


@dataclass(frozen=True)
class SettingChange:
    """A requested change of a live setting; ``configured``: train.json says so."""

    value: Any
    source: str
    configured: bool


@dataclass
class Commands:
    """Requests components made, carried out by the trainer after the hooks of the moment.

    A checkpoint request is carried out after the ``on_optimizer_step`` or ``on_epoch_end``
    hooks (the next of them), when the run's position is between accumulation windows; it must
    be made in every process (saving waits for all). A setting change takes effect at the next
    epoch boundary (before the first batch of the epoch whose ``on_epoch_start`` requested it);
    the main process's requests are the ones every process applies.
    """

    checkpoints: list[tuple[str, bool]] = field(default_factory=list)
    settings: dict[str, SettingChange] = field(default_factory=dict)

    def request_checkpoint(self, kind: str, with_state: bool) -> None:
        if (kind, with_state) not in self.checkpoints:
            self.checkpoints.append((kind, with_state))

    def change_setting(self, key: str, value: Any, source: str, configured: bool = False) -> None:
        """`UserError` for a key that cannot change or a value its rule refuses."""
        self.settings[key] = SettingChange(check_live_value(key, value), source, configured)

    def take_checkpoints(self) -> list[tuple[str, bool]]:
        taken, self.checkpoints = self.checkpoints, []
        return taken

    def take_settings(self) -> dict[str, SettingChange]:
        taken, self.settings = self.settings, {}
        return taken


class TrainingContext:
    """The run as a component sees it (read-only), and its commands."""

    def __init__(
        self,
        *,
        config: TrainConfig,
        env: Environment,
        models: StepModels,
        dataset: TrainDataset,
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: LoopState,
        commands: Commands,
    ) -> None:
        self._config = config
        self._state = state
        self._commands = commands
        self._config_for: tuple[LiveSettings, TrainConfig] | None = None
        self.env = env
        self.models = models
        self.dataset = dataset
        self.optimizers: Mapping[str, torch.optim.Optimizer] = types.MappingProxyType(
            dict(optimizers)
        )

    @property
    def progress(self) -> Counters:
        """The counters now: the position names the next batch."""
        return self._state.counters

    @property
    def settings(self) -> LiveSettings:
        """The live settings in force."""
        return self._state.settings

    @property
    def configured_settings(self) -> LiveSettings:
        """The live settings as train.json and the command line last gave them."""
        return self._state.configured

    @property
    def config(self) -> TrainConfig:
        """The run's train.json settings, the live ones as they are in force."""
        settings = self._state.settings
        if self._config_for is None or self._config_for[0] is not settings:
            self._config_for = (settings, dataclasses.replace(self._config, **settings.as_dict()))
        return self._config_for[1]

    @property
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, with the grad_accum in force from now on."""
        return self._state.total_optimizer_steps

    @property
    def last_captions(self) -> tuple[str, ...]:
        """The captions of the last batch trained."""
        return self._state.last_captions

    @property
    def last_checkpoint(self) -> Path | None:
        return self._state.last_checkpoint

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches of ``epoch`` for this process (epochs of a rated dataset differ)."""
        return self.dataset.batches_in_epoch(epoch)

    def request_checkpoint(self, kind: str, with_state: bool) -> None:
        """Ask for a checkpoint of ``kind`` (see `Commands`)."""
        self._commands.request_checkpoint(kind, with_state)

    def change_setting(self, key: str, value: Any, source: str, configured: bool = False) -> None:
        """Ask for a live setting to change at the next epoch boundary (see `Commands`).
        ``configured``: the value is what train.json now says."""
        self._commands.change_setting(key, value, source, configured)
