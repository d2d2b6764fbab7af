"""How a checkpoint is written: `SaveOptions`, and `LoraExport` for a LoRA run's checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora.kohya import KohyaInfo
from lora.settings import LoraSettings


@dataclass(frozen=True)
class LoraExport:
    """What a LoRA run's checkpoints need besides the models: the adapters' settings, the
    base model and what kohya's metadata says about the run."""

    settings: LoraSettings
    base_model: str  # where resuming loads the frozen base model from
    v2: bool
    v_prediction: bool
    resolution: int
    sdxl: bool
    started_at: float  # time.time() when the run started
    merge: bool  # lora_merge: also write the merged model

    def kohya_info(self, name: str, epoch: int, steps: int) -> KohyaInfo:
        return KohyaInfo(
            output_name=name,
            training_started_at=self.started_at,
            steps=steps,
            epoch=epoch,
            v2=self.v2,
            v_prediction=self.v_prediction,
            sdxl=self.sdxl,
            resolution=self.resolution,
            base_model=self.base_model,
        )

    def as_dict(self) -> dict[str, Any]:
        """What ``training_state/lora.json`` records (the base model and the settings)."""
        s = self.settings
        return {
            "base_model": self.base_model,
            "rank": s.rank,
            "alpha": s.alpha,
            "dropout": s.dropout,
            "conv_rank": s.conv_rank,
            "conv_alpha": s.conv_alpha,
        }


@dataclass(frozen=True)
class SaveOptions:
    """How a checkpoint is written: fp32 or fp16 weights, a single file beside it, its note;
    ``lora``: the run trains LoRA adapters, and its checkpoints hold them (not the models)."""

    full_precision: bool = False
    single_file: bool = False
    note: dict[str, Any] | None = None  # JSON-able, written to dreamtrainer.json
    lora: LoraExport | None = None
