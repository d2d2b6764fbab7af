"""`Run`: a run built from its configuration, ready to train or to describe in a dry run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from config.load import LoadedTrainConfig
from data import TrainDataset
from models import ModelBundle
from optimizer.build import FreezeReport, ModelTraining
from optimizer.config import OptimizerConfig
from plugins.plugins import BasePlugin
from training.ema import EmaSettings
from training.samples import SampleSettings
from training.state import TrainingState
from training.validation.sets import ValidationData


@dataclass
class Run:
    """A run, built and ready to train (or to describe in a dry run)."""

    train: LoadedTrainConfig
    optim: OptimizerConfig
    seed: int
    device: torch.device
    dataset: TrainDataset
    models: ModelBundle
    freezing: FreezeReport
    unet: ModelTraining | None
    text_encoder: ModelTraining | None
    total_optimizer_steps: int
    samples: SampleSettings | None
    resume_state: TrainingState | None
    base_model: str  # where the weights the run started from are (for frozen models' exactness)
    plugins: list[BasePlugin] = field(default_factory=list)
    ema: EmaSettings | None = None  # the EMA of the trained weights; None: off
    validation: ValidationData | None = None  # the validation_config's sets

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's training state must match to be resumed by this run."""
        return {
            name: None
            if training is None
            else {
                "optimizer": training.settings.name,
                "trainable_parameters": training.trainable_parameters,
            }
            for name, training in (("unet", self.unet), ("text_encoder", self.text_encoder))
        }

    @property
    def trainings(self) -> list[ModelTraining]:
        """The optimizers that exist (a model that is not trained has none)."""
        return [t for t in (self.unet, self.text_encoder) if t is not None]
