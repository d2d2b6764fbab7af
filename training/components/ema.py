"""EMA: a moving average of the trained weights, its ``_ema`` checkpoints and its samples.

Registered before the samples and checkpoint components: it updates on ``on_optimizer_step``,
so samples and checkpoints of the same step see the updated EMA. The EMA exists in the main
process only (the others hold the same weights and never save or sample). Its weights and
update count are part of the training state, so exact resume covers them bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config.errors import UserError
from models.copies import sharing_copy
from training.checkpointing.options import LoraExport, SaveOptions
from training.checkpointing.writer import save_checkpoint
from training.components.base import Component, OptimizerStep, SavedCheckpoint
from training.context import TrainingContext
from training.ema import (
    EMA_SUFFIX,
    EmaSettings,
    ParameterEMA,
    load_start_weights,
    tracked_parameters,
)

logger = logging.getLogger(__name__)


def ema_checkpoint_path(path: Path) -> Path:
    """Where the EMA pipeline of checkpoint ``path`` goes: ``<path>_ema`` (EveryDream2's name)."""
    return path.with_name(f"{path.name}{EMA_SUFFIX}")


class EMA(Component):
    """Keeps the EMA, writes ``<checkpoint>_ema`` beside each checkpoint, lends its weights."""

    name = "ema"

    def __init__(self, settings: EmaSettings, lora: LoraExport | None = None) -> None:
        """``lora``: the run trains LoRA adapters; ``_ema`` checkpoints are LoRA files."""
        self.settings = settings
        self.lora = lora
        self.weights: ParameterEMA | None = None
        self.updates = 0
        self._saved: dict[str, Any] | None = None

    def on_training_start(self, ctx: TrainingContext) -> None:
        saved, self._saved = self._saved, None
        if not ctx.env.is_main_process:
            return
        trained = list(ctx.optimizers)
        parameters = tracked_parameters(ctx.models.bundle, trained)
        names = [name for name, _ in parameters]
        s = self.settings
        if saved is not None:
            where = f"the training state of {ctx.config.resume_ckpt}"
            origin, start = f"resume_ckpt: the EMA in {where}", saved["weights"]
            self.updates = int(saved["updates"])
        elif s.start_model is not None:
            where, origin = s.start_model, f"ema_resume_model: {s.start_model}"
            start = load_start_weights(s.start_model, names)
        else:
            where, origin, start = "the weights training starts from", "", None
        self.weights = ParameterEMA(parameters, s.device, start, origin)
        logger.info(
            "EMA of %s: decay %.10g every %d optimizer steps (%d updates in the run), in %s "
            "memory, from %s",
            " and ".join(trained),
            s.decay,
            s.interval,
            s.updates_in_run,
            s.device,
            where,
        )

    def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
        if self.weights is not None and step.global_step % self.settings.interval == 0:
            self.weights.update(self.settings.decay)
            self.updates += 1

    def on_checkpoint(self, ctx: TrainingContext, checkpoint: SavedCheckpoint) -> None:
        """``<path>_ema``: the pipeline with the EMA weights (and ``<path>_ema.safetensors``)."""
        if self.weights is None:
            return
        note = {
            "run": ctx.env.run_id,
            "kind": checkpoint.kind,
            "ema": True,
            "decay": self.settings.decay,
            "ema_updates": self.updates,
        }
        options = SaveOptions(
            full_precision=ctx.settings.save_full_precision,
            single_file=not ctx.settings.no_save_ckpt,
            note=note,
            lora=self.lora,
        )
        with self.weights.swapped_in():
            save_checkpoint(ema_checkpoint_path(checkpoint.path), ctx.models.bundle, None, options)

    def sample_weights(self) -> list[tuple[str, contextlib.AbstractContextManager[Any]]]:
        """What samples are drawn with: (name suffix, context in which the live modules hold
        those weights) for the trained weights ("") and/or the EMA ("_ema"), as configured."""
        weights: list[tuple[str, contextlib.AbstractContextManager[Any]]] = []
        if self.settings.sample_trained:
            weights.append(("", contextlib.nullcontext()))
        if self.settings.sample_ema and self.weights is not None:
            weights.append((EMA_SUFFIX, self.weights.swapped_in()))
        return weights

    def modules(self, ctx: TrainingContext) -> dict[str, nn.Module]:
        """Model name -> a module holding the EMA weights (the EMA's own tensors, shared; the
        frozen ones are the live model's), for plugins; empty until training starts and in
        LoRA runs (a model with adapters has no such copy: docs/lora.md)."""
        if self.weights is None or self.lora is not None:
            return {}
        bundle = ctx.models.bundle
        views = {}
        for name, mine in _by_prefix(self.weights.state_dict()).items():
            if name == "text_encoder" and bundle.text_encoder_2 is not None:  # SDXL: each encoder
                for part, weights in _by_prefix(mine).items():
                    views[part] = sharing_copy(getattr(bundle, part), weights)
            else:
                views[name] = sharing_copy(getattr(bundle, name), mine)
        return views

    def state_dict(self) -> dict[str, Any] | None:
        if self.weights is None:
            return None
        return {
            "weights": self.weights.state_dict(),
            "updates": self.updates,
            "decay": self.settings.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("weights"), dict) or not isinstance(state.get("updates"), int):
            raise UserError("resume_ckpt: the EMA in its training state is malformed")
        self._saved = state

    def describe(self) -> dict[str, Any] | None:
        return self.settings.describe()


def _by_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"a.x": t}`` → ``{"a": {"x": t}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
        out.setdefault(head, {})[rest] = tensor
    return out
