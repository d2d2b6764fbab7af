"""Driving the real trainer from a benchmark script: train.py's building code and a step hook.

The benchmarks time the trainer as a user runs it, so they build the run with train.py's own
`build_from_command_line` and train it with `training.session.run_training` itself, with one
extra component whose ``on_optimizer_step`` runs the benchmark's hook (given the components'
context) after each optimizer step
(after everything the trainer's own components do in that step: logging, progress bar). A
hook ends the run at once by raising `BenchmarkFinished` (no checkpoint is written).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

import training.session
from config.cli import parse_command_line
from training.build import Run, build_from_command_line
from training.components import Component, OptimizerStep
from training.context import TrainingContext
from training.loop import StopTraining

REPO = Path(__file__).resolve().parent.parent

StepHook = Callable[[TrainingContext], None]
SHIPPED_OPTIMIZER_JSON = REPO / "optimizer.json"


class BenchmarkFinished(StopTraining):
    """Raised by a step hook: the benchmark has what it needs; training stops here."""


def build_run_from_flags(argv: list[str]) -> tuple[Run, Accelerator]:
    """The built run for ``train.py`` flags, exactly as ``train.py`` builds it."""
    return build_from_command_line(parse_command_line(argv))


def write_optimizer_json(folder: Path, optimizer: str) -> Path:
    """The shipped optimizer.json with ``optimizer`` for both models, written into ``folder``."""
    preset = json.loads(SHIPPED_OPTIMIZER_JSON.read_text(encoding="utf-8"))
    changed = copy.deepcopy(preset)
    changed["base"]["optimizer"] = optimizer
    changed.setdefault("text_encoder_overrides", {})["optimizer"] = None  # copies base
    path = folder / f"optimizer-{optimizer}.json"
    path.write_text(json.dumps(changed, indent=2), encoding="utf-8")
    return path


def train_with_hook(run: Run, accelerator: Accelerator, hook: StepHook) -> None:
    """`run_training` with ``hook(context)`` after every optimizer step.

    The hook must raise `BenchmarkFinished` before the run ends by itself: a run that reaches
    its last epoch is an error here (raise max_epochs).
    """

    class Hook(Component):
        def on_optimizer_step(self, ctx: TrainingContext, step: OptimizerStep) -> None:
            hook(ctx)

    try:
        training.session.run_training(run, accelerator, extra_components=[Hook()])
    except BenchmarkFinished:
        return
    raise RuntimeError("the run ended before the benchmark had its steps: raise max_epochs")
