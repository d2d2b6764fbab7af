"""Checks and defaults that need to know the model but not its weights: run before it loads."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from config.load import DEFAULT, LoadedTrainConfig
from models import builtin_text_encoder_layers, classify_resume_ckpt
from models.loading import SourceKind, is_sdxl
from models.single_file_load import single_file_text_encoder_layers
from optimizer.build import freeze_plan
from optimizer.config import OptimizerConfig
from training.lora_setup import weights_source

logger = logging.getLogger(__name__)

# What ``resolution`` is for SDXL models when train.json and the command line do not set it.
SDXL_RESOLUTION = 1024


def expected_text_encoder_layers(resume_ckpt: str) -> int | None:
    """The text encoder's layer count read without building a model, when it can be."""
    resume_ckpt = weights_source(resume_ckpt).model
    kind = classify_resume_ckpt(resume_ckpt)
    if kind is SourceKind.BUILTIN:
        return builtin_text_encoder_layers(resume_ckpt)
    if kind is SourceKind.LOCAL:
        config_file = Path(resume_ckpt).expanduser() / "text_encoder" / "config.json"
        try:
            return int(json.loads(config_file.read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError):
            return None  # from_pretrained will say what is wrong with the folder
    if kind is SourceKind.SINGLE_FILE:
        return single_file_text_encoder_layers(Path(resume_ckpt).expanduser())
    return None


def check_before_models(train: LoadedTrainConfig, optim: OptimizerConfig) -> None:
    """Checks that need the model's shape but not its weights: run before anything loads."""
    assert train.config.resume_ckpt is not None
    num_layers = expected_text_encoder_layers(train.config.resume_ckpt)
    if num_layers is not None:
        freeze_plan(optim, num_layers)


def with_family_resolution(train: LoadedTrainConfig) -> LoadedTrainConfig:
    """``resolution`` 1024 for an SDXL model when nothing set it (512, its default, is for
    SD1.x/2.x); a model that cannot be told before loading keeps the default, with a warning."""
    c = train.config
    if train.sources["resolution"] != DEFAULT:
        return train
    assert c.resume_ckpt is not None
    sdxl = is_sdxl(weights_source(c.resume_ckpt).model)
    if sdxl is None:
        logger.warning(
            "resolution not set and %s is not known to be SDXL before it loads: training at %d; "
            "set resolution (1024 for SDXL)",
            c.resume_ckpt,
            c.resolution,
        )
    if not sdxl:
        return train
    logger.info("resolution not set: %d, SDXL's own", SDXL_RESOLUTION)
    config = dataclasses.replace(c, resolution=SDXL_RESOLUTION)
    return dataclasses.replace(train, config=config)
