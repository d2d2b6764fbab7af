"""The rules between the ``ema_*`` keys of train.json, checked before anything loads.

EMA is on when ``ema_decay_rate`` or ``ema_strength_target`` is set (EveryDream2's rule). Each
key is checked by its own rule in `config.train_config`; here their combinations.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from config.train_config import TrainConfig

if TYPE_CHECKING:
    from config.load import LoadedTrainConfig

logger = logging.getLogger(__name__)

DECAY_KEYS = ("ema_decay_rate", "ema_strength_target")
# Keys that ask for something only EMA does: an error while EMA is off.
NEEDS_EMA = ("ema_resume_model", "ema_sample_ema_model")
# Settings of EMA that merely do not apply while it is off: a warning.
EMA_SETTINGS = ("ema_update_interval", "ema_device", "ema_sample_nonema_model")


def ema_enabled(config: TrainConfig) -> bool:
    """Whether the run keeps an EMA of its weights."""
    return config.ema_decay_rate is not None or config.ema_strength_target is not None


def ema_problems(loaded: LoadedTrainConfig) -> list[str]:
    """One line per combination of ``ema_*`` keys that cannot be used; warnings are logged."""
    c = loaded.config
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [key for key in NEEDS_EMA + EMA_SETTINGS if getattr(c, key) != defaults[key]]
    if c.ema_decay_rate is not None and c.ema_strength_target is not None:
        return [
            f"{loaded.where('ema_strength_target')}: give ema_decay_rate or "
            "ema_strength_target, not both (each sets the EMA's decay rate)"
        ]
    if not ema_enabled(c):
        problems = [
            f"{loaded.where(key)}: EMA is off; set ema_decay_rate or ema_strength_target "
            "to enable it"
            for key in changed
            if key in NEEDS_EMA
        ]
        ignored = [key for key in changed if key in EMA_SETTINGS]
        if ignored:
            logger.warning(
                "%s: no effect while EMA is off (set ema_decay_rate or ema_strength_target to "
                "enable it)",
                ", ".join(loaded.where(key) for key in ignored),
            )
        return problems
    sampling = [key for key in changed if key.startswith("ema_sample_")]
    if sampling and c.sample_prompts is None:
        logger.warning(
            "%s: no samples are made: sample_prompts is not set",
            ", ".join(loaded.where(key) for key in sampling),
        )
    return []
