"""How the live settings change during a run, and how a resume picks them up.

- A run starts with the live keys of train.json and the command line.
- Components (the train.json reloader, plugins) ask for changes through the context; the
  trainer applies them at the next epoch boundary, the main process's requests in every
  process.
- A training state stores the settings in force and what train.json / the command line said
  of them then (``configured``). On resume, the saved settings are in force again (a plugin's
  change survives), except for the keys the user edited since: those take the new value, at
  once, or for ``grad_accum`` resumed mid-epoch from the next epoch (accumulation windows
  restart each epoch). So resuming from any checkpoint reproduces the straight run, and an
  edit made before resuming is used, not silently ignored.

A change of ``grad_accum`` changes the number of optimizer steps left; the LR schedule and the
EMA decay keep the length they were sized for when the run started (`training.length`).
"""

from __future__ import annotations

import logging
from typing import Any

from config.live import LiveSettings
from optimizer.schedulers import optimizer_steps_per_epoch
from training.checkpointing.state import TrainingState
from training.context import Commands, Counters, LoopState, SettingChange
from training.distributed import broadcast_object
from training.environment import Environment
from training.length import optimizer_steps
from training.run import Run

logger = logging.getLogger(__name__)


class LiveUpdates:
    """The trainer's side of the live settings."""

    def __init__(self, run: Run, env: Environment) -> None:
        self.run = run
        self.env = env

    def start(self) -> LoopState:
        """The loop's state at the start of a run: train.json's live settings in force."""
        settings = LiveSettings.of(self.run.train.config)
        counters = Counters()
        accum = settings.grad_accum
        return LoopState(counters, settings, settings, self.total_steps(counters, accum, accum))

    def total_steps(self, counters: Counters, accum_now: int, accum_later: int) -> int:
        """Optimizer steps of the whole run: done, this epoch's rest with ``accum_now``, later
        epochs with ``accum_later``."""
        max_epochs = self.run.train.config.max_epochs
        data = self.run.dataset
        if counters.epoch >= max_epochs:
            return counters.global_step
        rest = optimizer_steps_per_epoch(
            data.batches_in_epoch(counters.epoch) - counters.batch_in_epoch, accum_now
        )
        later = optimizer_steps(data, max_epochs, accum_later, counters.epoch + 1)
        return counters.global_step + rest + later

    def apply(self, state: LoopState, changes: dict[str, SettingChange]) -> None:
        """Apply the changes the main process was asked for (at an epoch boundary)."""
        changes = broadcast_object(changes, self.env.device)
        if not changes:
            return
        before = state.settings
        state.settings = before.with_changes({k: c.value for k, c in changes.items()})
        configured = {k: c.value for k, c in changes.items() if c.configured}
        if configured:
            state.configured = state.configured.with_changes(configured)
        epoch = state.counters.epoch + 1
        for key, change in changes.items():
            old = getattr(before, key)
            if old != change.value:
                logger.info(
                    "epoch %d: %s %r -> %r (%s)", epoch, key, old, change.value, change.source
                )
        if state.settings.grad_accum != before.grad_accum:
            accum = state.settings.grad_accum
            state.total_optimizer_steps = self.total_steps(state.counters, accum, accum)
            self._log_length(state)

    def _log_length(self, state: LoopState) -> None:
        planned = self.run.length
        logger.info(
            "grad_accum %d: the run now has %d optimizer steps; the LR schedule and the EMA keep "
            "the length they were sized for (%d steps at grad_accum %d)",
            state.settings.grad_accum,
            state.total_optimizer_steps,
            planned.planned_steps,
            planned.schedule_grad_accum,
        )

    def resume(
        self, state: LoopState, saved: TrainingState, counters: Counters, commands: Commands
    ) -> None:
        """The settings to continue with from a training state (see the module docstring)."""
        now = state.configured
        legacy = now.with_changes(_legacy_values(saved.counters))
        in_force = LiveSettings.from_saved(saved.counters.get("live_settings"), legacy)
        then = LiveSettings.from_saved(saved.counters.get("configured_settings"), in_force)
        edits = then.differences(now)
        mid_epoch = counters.batch_in_epoch > 0
        later = (
            {"grad_accum": edits.pop("grad_accum")} if mid_epoch and "grad_accum" in edits else {}
        )
        state.counters = counters
        state.settings = in_force.with_changes(edits)
        for key, value in (edits | later).items():
            when = "from the next epoch (the checkpoint is mid-epoch)" if key in later else "now"
            logger.warning(
                "%s: %r when the checkpoint was saved, %r now: the new value applies %s",
                key,
                getattr(then, key),
                value,
                when,
            )
        kept = now.differences(state.settings)
        if kept:
            logger.info(
                "resuming with settings changed during the run: %s",
                ", ".join(f"{k}={v!r}" for k, v in kept.items()),
            )
        for key, value in later.items():
            commands.change_setting(key, value, "train.json", configured=True)
        for key, change in _pending(saved.counters).items():
            commands.change_setting(key, change.value, change.source, change.configured)
        accum = state.settings.grad_accum
        state.total_optimizer_steps = self.total_steps(
            counters, accum, later.get("grad_accum", accum)
        )
        if later or "grad_accum" in edits:
            self._log_length(state)


def _pending(counters: dict[str, Any]) -> dict[str, SettingChange]:
    """The changes asked for mid-epoch before the checkpoint, still to be applied."""
    pending = counters.get("pending_settings")
    if not isinstance(pending, dict):
        return {}
    return {
        key: SettingChange(entry["value"], str(entry["source"]), bool(entry["configured"]))
        for key, entry in pending.items()
        if isinstance(entry, dict) and {"value", "source", "configured"} <= set(entry)
    }


def _legacy_values(counters: dict[str, Any]) -> dict[str, Any]:
    """What a training state from before live settings were stored says of them."""
    accum = counters.get("grad_accum")
    return {"grad_accum": accum} if isinstance(accum, int) and accum >= 1 else {}
