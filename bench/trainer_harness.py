"""Driving the real trainer from a benchmark script: train.py's building code and a step hook.

The benchmarks time the trainer as a user runs it, so they build the run the way ``train.py``
does (command-line flags → `load_train_config` → `load_optimizer_config` → `build_run`) and
train it with `training.session.run_training` itself. The only thing they change is the
`Trainer` class that `run_training` instantiates: a subclass that calls a hook after each
optimizer step (after everything the trainer does in that step: scheduler, logging, progress
bar). A hook ends the run at once by raising `BenchmarkFinished` (no checkpoint is written).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator

import training.session
from config.cli import parse_command_line
from config.load import load_train_config
from optimizer.config import load_optimizer_config
from training.build import Run, build_run
from training.distributed import make_accelerator, training_device
from training.loop import Trainer

REPO = Path(__file__).resolve().parent.parent

StepHook = Callable[[Trainer], None]
SHIPPED_OPTIMIZER_JSON = REPO / "optimizer.json"


class BenchmarkFinished(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a step hook: the benchmark has what it needs; training stops here."""


def build_run_from_flags(argv: list[str]) -> tuple[Run, Accelerator]:
    """The built run for ``train.py`` flags, exactly as ``train.py`` builds it."""
    command_line = parse_command_line(argv)
    train = load_train_config(command_line)
    optim = load_optimizer_config(train)
    accelerator = make_accelerator()
    device = training_device(accelerator, train.config.gpuid)
    run = build_run(train, optim, device, accelerator.process_index, accelerator.num_processes)
    return run, accelerator


def write_optimizer_json(folder: Path, optimizer: str) -> Path:
    """The shipped optimizer.json with ``optimizer`` for both models, written into ``folder``."""
    preset = json.loads(SHIPPED_OPTIMIZER_JSON.read_text(encoding="utf-8"))
    changed = copy.deepcopy(preset)
    changed["base"]["optimizer"] = optimizer
    changed.setdefault("text_encoder_overrides", {})["optimizer"] = None  # copies base
    path = folder / f"optimizer-{optimizer}.json"
    path.write_text(json.dumps(changed, indent=2), encoding="utf-8")
    return path


@contextmanager
def _trainer_class(cls: type[Trainer]) -> Iterator[None]:
    original = training.session.Trainer
    training.session.Trainer = cls  # type: ignore[misc]
    try:
        yield
    finally:
        training.session.Trainer = original  # type: ignore[misc]


def train_with_hook(run: Run, accelerator: Accelerator, hook: StepHook) -> Trainer:
    """`run_training` with ``hook(trainer)`` after every optimizer step; returns the trainer.

    The hook must raise `BenchmarkFinished` before the run ends by itself: a run that reaches
    its last epoch is an error here (raise max_epochs).
    """
    made: list[Trainer] = []

    class HookedTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def _optimizer_step(self) -> None:
            super()._optimizer_step()
            hook(self)

    with _trainer_class(HookedTrainer):
        try:
            training.session.run_training(run, accelerator)
        except BenchmarkFinished:
            return made[0]
    raise RuntimeError("the run ended before the benchmark had its steps: raise max_epochs")
