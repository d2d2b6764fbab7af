"""The settings a run reads as it goes: the one home of the keys that may change mid-run.

`LiveSettings` holds the train.json keys that the loop, the step and the checkpoint policy read
while training. They are the only keys that may change during a run: through
``load_settings_every_epoch`` (train.json read again before each epoch), through a plugin's
``arg_update_callback``, or by editing train.json before a resume. A change always takes effect
at an epoch boundary (see docs/checkpoints.md, "Settings that change during a run"); the trainer
owns the settings in force and is the only one that replaces them.

`StepSettings` is the part the training step reads (noise, timesteps, loss); the step receives
it, not the whole `TrainConfig`. Types, rules and defaults are `TrainConfig`'s: nothing is
declared twice. This module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

from config.errors import UserError, did_you_mean
from config.fields import InvalidValueError, check_value, field_types, rule_of
from config.train_config import TrainConfig


@dataclass(frozen=True)
class StepSettings:
    """What one training step reads: noise, timesteps and the loss."""

    zero_frequency_noise_ratio: float
    pyramid_noise_discount: float | None
    timestep_start: int
    timestep_end: int
    loss_type: str
    min_snr_gamma: float | None
    debiased_estimation: bool
    input_perturbation: float
    unmasked_weight: float
    normalize_masked_area_loss: bool
    embedding_perturbation: float


@dataclass(frozen=True)
class LiveSettings(StepSettings):
    """Every key that may change during a run, with the value in force."""

    grad_accum: int
    clip_grad_norm: float | None
    log_step: int
    sample_steps: int
    save_every_n_epochs: int | None
    ckpt_every_n_minutes: float | None
    save_ckpts_from_n_epochs: int
    save_optimizer: bool
    save_full_precision: bool
    no_save_ckpt: bool

    @classmethod
    def of(cls, config: TrainConfig) -> LiveSettings:
        """The live keys of ``config``."""
        return cls(**{key: getattr(config, key) for key in LIVE_KEYS})

    @property
    def step(self) -> StepSettings:
        """The part the training step reads."""
        return StepSettings(**{key: getattr(self, key) for key in STEP_KEYS})

    def differences(self, other: LiveSettings) -> dict[str, Any]:
        """The keys whose value in ``other`` differs, with ``other``'s values."""
        return {k: getattr(other, k) for k in LIVE_KEYS if getattr(other, k) != getattr(self, k)}

    def with_changes(self, changes: dict[str, Any]) -> LiveSettings:
        """These settings with ``changes`` applied; `UserError` when the result is inconsistent."""
        changed = dataclasses.replace(self, **changes)
        if changed.timestep_start >= changed.timestep_end:
            raise UserError(
                f"timestep_start must be below timestep_end ({changed.timestep_start} >= "
                f"{changed.timestep_end})"
            )
        return changed

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: what a training state stores."""
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: Any, fallback: LiveSettings) -> LiveSettings:
        """Settings from a training state's dict; keys it lacks or cannot hold come from
        ``fallback`` (a state written by an older version stores fewer keys)."""
        values = fallback.as_dict()
        if isinstance(saved, dict):
            for key in LIVE_KEYS:
                if key in saved:
                    with contextlib.suppress(UserError):
                        values[key] = check_live_value(key, saved[key])
        return cls(**values)


STEP_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StepSettings))
LIVE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LiveSettings))


def check_live_value(key: str, value: Any) -> Any:
    """``value`` checked by ``key``'s own rule and typed; `UserError` for a key that cannot
    change mid-run or a value its rule refuses."""
    if key not in LIVE_KEYS:
        raise UserError(
            f"'{key}' cannot change during a run{did_you_mean(key, LIVE_KEYS)}; the keys that "
            f"can: {', '.join(LIVE_KEYS)}"
        )
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == key)
    if value is None:
        if field.default is not None:
            raise UserError(f"{key}: null is not allowed here")
        return None
    try:
        return check_value(value, field_types(TrainConfig)[key], rule_of(field))
    except InvalidValueError as error:
        raise UserError(f"{key}: {error}") from None
