"""A LoRA run's build steps: where the base model comes from, adapters in, their start values.

With ``lora_rank`` above 0 the run trains peft adapters instead of the weights (docs/lora.md):

- `weights_source`: ``resume_ckpt`` may be a LoRA run's checkpoint; its models are then the
  base model its ``training_state/lora.json`` names, and its adapters are restored exactly;
- `add_run_adapters`: adapters go where training goes (the UNet unless
  ``disable_unet_training``, the text encoder only when it trains, never in its frozen layers),
  then start from the checkpoint being resumed, from ``lora_init``, or fresh (seeded by the
  run's seed);
- `lora_export`: what the run's checkpoints need to write LoRA files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from config.errors import UserError
from config.load import LoadedTrainConfig, find_input_file
from lora.inject import add_lora_adapters
from lora.reading import apply_lora_init, check_lora_init, read_lora_file
from lora.settings import LoraSettings, lora_settings
from models import ModelBundle
from optimizer.build import FreezeReport
from training.checkpointing.lora_writer import (
    adapted_models,
    is_lora_checkpoint,
    read_lora_state,
    restore_adapters,
)
from training.checkpointing.options import LoraExport
from training.precision import DTYPES, choose_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsSource:
    """Where a run's model weights come from: ``resume_ckpt`` itself, or (``lora_checkpoint``
    set) the base model of the LoRA checkpoint being resumed."""

    model: str
    lora_checkpoint: Path | None = None
    saved: dict[str, Any] | None = None  # the checkpoint's lora.json


def weights_source(resume_ckpt: str) -> WeightsSource:
    """Where the models of a run from ``resume_ckpt`` come from."""
    path = Path(resume_ckpt).expanduser()
    if not (path.is_dir() and is_lora_checkpoint(path)):
        return WeightsSource(resume_ckpt)
    saved = read_lora_state(path)
    if saved is None:
        raise UserError(
            f"resume_ckpt: {path} holds LoRA adapters but no training state to resume; to train "
            f"on from its adapters, set resume_ckpt to its base model and lora_init: {path}"
        )
    return WeightsSource(saved["base_model"], path, saved)


def add_run_adapters(
    train: LoadedTrainConfig,
    models: ModelBundle,
    freezing: tuple[FreezeReport, ...],
    source: WeightsSource,
    seed: int,
) -> LoraSettings | None:
    """Put the run's adapters into ``models`` (None: a full fine-tune, nothing done)."""
    c = train.config
    settings = lora_settings(c)
    if settings is None:
        if source.saved is not None:
            raise UserError(
                f"resume_ckpt: {source.lora_checkpoint} is a checkpoint of a LoRA run (rank "
                f"{source.saved.get('rank')}): set lora_rank to resume it"
            )
        return None
    add_lora_adapters(
        models,
        settings,
        train_unet=not c.disable_unet_training,
        train_text_encoder=not c.disable_textenc_training,
        frozen_text_layers=freezing[0].plan.frozen_layers,
        frozen_text_layers_2=freezing[-1].plan.frozen_layers if len(freezing) > 1 else (),
        seed=seed,
    )
    if not adapted_models(models):
        raise UserError(
            "lora_rank: no model gets adapters (the UNet and the text encoder are both frozen); "
            "enable training of one of them"
        )
    if source.lora_checkpoint is not None:
        restore_adapters(source.lora_checkpoint, adapted_models(models))
    elif c.lora_init is not None:
        path = find_input_file(c.lora_init, train.folder, "lora_init")
        file = read_lora_file(path, models.named_models())
        check_lora_init(file, settings)
        apply_lora_init(file, adapted_models(models))
    return settings


def store_base_weights(train: LoadedTrainConfig, models: ModelBundle, device: torch.device) -> None:
    """``lora_base_dtype``: the frozen weights of the UNet and the text encoders in that dtype
    (adapters and the VAE stay fp32). The autocast must be of the same dtype: `UserError`."""
    c = train.config
    if c.lora_rank == 0 or c.lora_base_dtype == "fp32":
        return
    dtype = DTYPES[c.lora_base_dtype]
    precision = choose_precision(device, c.mixed_precision, c.disable_amp)
    if precision.dtype != dtype:
        raise UserError(
            f"lora_base_dtype: {c.lora_base_dtype} needs an autocast of {c.lora_base_dtype}; "
            f"mixed_precision {c.mixed_precision} on {device} is {precision.describe()}: set "
            f"mixed_precision: {c.lora_base_dtype}"
        )
    stored = 0
    for model in (models.unet, *models.text_encoders):
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
                stored += parameter.numel()
    logger.info("lora_base_dtype: %d frozen base weights kept in %s", stored, c.lora_base_dtype)


def lora_export(
    train: LoadedTrainConfig, settings: LoraSettings | None, models: ModelBundle, base_model: str
) -> LoraExport | None:
    """What the run's checkpoints need to write its LoRA files (None: a full fine-tune)."""
    if settings is None:
        return None
    c = train.config
    return LoraExport(
        settings=settings,
        base_model=base_model,
        v2=models.family == "sd2",
        sdxl=models.family == "sdxl",
        v_prediction=models.noise_scheduler.config.prediction_type == "v_prediction",
        resolution=c.resolution,
        started_at=time.time(),
        merge=c.lora_merge,
    )
