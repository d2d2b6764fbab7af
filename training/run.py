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
from training.checkpointing.options import LoraExport
from training.checkpointing.state import TrainingState
from training.distributed import FsdpOptions
from training.ema import EmaSettings
from training.length import RunLength
from training.samples import SampleSettings
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
    freezing: tuple[FreezeReport, ...]  # one per text encoder
    unet_training: ModelTraining | None  # the UNet's optimizer and LR scheduler; None: frozen
    text_encoder_training: ModelTraining | None
    length: RunLength  # what the LR schedule and the EMA were sized for
    samples: SampleSettings | None
    resume_state: TrainingState | None
    base_model: str  # where the weights the run started from are (for frozen models' exactness)
    plugins: list[BasePlugin] = field(default_factory=list)
    ema: EmaSettings | None = None  # the EMA of the trained weights; None: off
    validation: ValidationData | None = None  # the validation_config's sets
    lora: LoraExport | None = None  # LoRA adapters train instead of the weights; None: full
    fsdp: FsdpOptions | None = None  # the trained models are sharded (training.fsdp); None: not

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's training state must match to be resumed by this run."""
        return {
            name: None
            if training is None
            else {
                "optimizer": training.settings.name,
                "trainable_parameters": training.trainable_parameters,
            }
            for name, training in self.trainings_by_model().items()
        } | ({} if self.lora is None else {"lora": self.lora.as_dict()})

    def trainings_by_model(self) -> dict[str, ModelTraining | None]:
        """Model name -> its optimizer and scheduler (None: not trained)."""
        return {"unet": self.unet_training, "text_encoder": self.text_encoder_training}

    @property
    def trainings(self) -> list[ModelTraining]:
        """The optimizers that exist (a model that is not trained has none)."""
        return [t for t in self.trainings_by_model().values() if t is not None]
