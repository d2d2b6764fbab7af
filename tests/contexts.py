"""Component contexts for tests, built from plain parts (no trainer, no run)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from config.live import LiveSettings
from config.train_config import TrainConfig
from training.components.base import OptimizerStep
from training.context import Commands, Counters, LoopState, TrainingContext
from training.environment import Environment
from training.precision import Precision
from training.step import Shard


def environment(main: bool = True, run_folder: Path | None = None) -> Environment:
    """A one-process CPU environment writing nothing."""
    return Environment(
        device=torch.device("cpu"),
        shard=Shard(),
        precision=Precision("cpu", None),
        source=None,  # type: ignore[arg-type]  (components under test read no batches)
        is_main_process=main,
        run_id="test-run",
        run_folder=run_folder,
        checkpoint_dir=run_folder or Path("."),
        metrics=None,
        barrier=lambda: None,
    )


def make_context(
    bundle: Any = None,
    trained: Sequence[str] = ("unet", "text_encoder"),
    main: bool = True,
    config: TrainConfig | None = None,
    counters: Counters | None = None,
    dataset: Any = None,
    commands: Commands | None = None,
) -> TrainingContext:
    """A context as the trainer builds one; ``trained`` names the models with an optimizer."""
    config = TrainConfig(resume_ckpt="tiny-sd15") if config is None else config
    settings = LiveSettings.of(config)
    dummy = torch.nn.Parameter(torch.zeros(1))
    return TrainingContext(
        config=config,
        env=environment(main),
        models=SimpleNamespace(bundle=bundle),  # type: ignore[arg-type]
        dataset=dataset,
        optimizers={name: torch.optim.SGD([dummy], lr=0.1) for name in trained},
        state=LoopState(counters or Counters(), settings, settings, total_optimizer_steps=10),
        commands=Commands() if commands is None else commands,
    )


def optimizer_step(global_step: int, epoch: int = 0, window: int = 0) -> OptimizerStep:
    """What the trainer reports after an optimizer step (a window of 2 images, loss 1.0)."""
    return OptimizerStep(
        global_step=global_step,
        epoch=epoch,
        window=window,
        windows_in_epoch=10,
        loss=1.0,
        images=2,
        stepped=True,
        lrs={},
        grad_norms={},
    )
