"""The rules between the ``lora_*`` keys of train.json, checked before anything loads.

LoRA is on when ``lora_rank`` is above 0. Each key is checked by its own rule in
`config.train_keys`; here their combinations. Asking for something only LoRA does
(``lora_conv_rank``, ``lora_init``, ``lora_merge``) while it is off is an error; a setting that
merely does not apply (``lora_alpha``, ``lora_dropout``, ``lora_conv_alpha`` without a conv rank)
is a warning.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from config.train_config import TrainConfig

if TYPE_CHECKING:
    from config.load import LoadedTrainConfig

logger = logging.getLogger(__name__)

# Keys that ask for something only LoRA does: an error while lora_rank is 0.
NEEDS_LORA = ("lora_conv_rank", "lora_init", "lora_merge")
# Settings of LoRA that merely do not apply while it is off: a warning.
LORA_SETTINGS = ("lora_alpha", "lora_dropout", "lora_conv_alpha")


def lora_enabled(config: TrainConfig) -> bool:
    """Whether the run trains LoRA adapters instead of the weights."""
    return config.lora_rank > 0


def _changed(config: TrainConfig, keys: tuple[str, ...]) -> list[str]:
    """The keys whose value is not their default (None, 0, 0.0 or False for these keys)."""
    return [key for key in keys if getattr(config, key) not in (None, 0, 0.0, False)]


def lora_problems(loaded: LoadedTrainConfig) -> list[str]:
    """One line per combination of ``lora_*`` keys that cannot be used; warnings are logged."""
    c = loaded.config
    if not lora_enabled(c):
        ignored = _changed(c, LORA_SETTINGS)
        if ignored:
            logger.warning(
                "%s: no effect while lora_rank is 0 (a full fine-tune)",
                ", ".join(loaded.where(key) for key in ignored),
            )
        asked = _changed(c, NEEDS_LORA) + (
            ["lora_base_dtype"] if c.lora_base_dtype != "fp32" else []
        )
        return [
            f"{loaded.where(key)}: needs LoRA, which is off; set lora_rank (e.g. 16) to train "
            "LoRA adapters"
            for key in asked
        ]
    problems = _base_dtype_problems(loaded)
    if c.lora_conv_rank == 0 and c.lora_conv_alpha is not None:
        logger.warning(
            "%s: no effect while lora_conv_rank is 0 (no 3x3 convolution adapters)",
            loaded.where("lora_conv_alpha"),
        )
    return problems


def _base_dtype_problems(loaded: LoadedTrainConfig) -> list[str]:
    """``lora_base_dtype`` other than fp32 needs an autocast of its dtype (the base layers then
    see inputs of their own dtype) and no merge (the merged model would hold rounded weights)."""
    c = loaded.config
    if c.lora_base_dtype == "fp32":
        return []
    problems = []
    if c.disable_amp or c.mixed_precision not in ("auto", c.lora_base_dtype):
        problems.append(
            f"{loaded.where('lora_base_dtype')}: {c.lora_base_dtype} needs mixed_precision "
            f"{c.lora_base_dtype} (or auto on a GPU that picks it), not "
            f"{'no' if c.disable_amp else c.mixed_precision}"
        )
    if c.lora_merge:
        problems.append(
            f"{loaded.where('lora_base_dtype')}: {c.lora_base_dtype} rounds the base weights, "
            "which lora_merge would write as a full model; merge with fp32 base weights (the "
            "default) or turn lora_merge off"
        )
    return problems
