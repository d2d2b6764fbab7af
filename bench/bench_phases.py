"""Where the trainer's step time goes next to the bare loop's, part by part (CPU).

    .venv/bin/python bench/bench_phases.py [--steps 700] [--threads 1]

`bench_overhead.py` says how much slower the trainer's step is than a bare diffusers loop; this
script says where. It builds the same two sides (train.py's flags → the real run on tiny-sd15
and the bundled images; `bench.bare_loop.BareLoop` on the trainer's own modules), then runs one
trainer step and one bare step in turn and times the parts of each:

- ``latents``: the VAE posterior of the batch (the trainer's batch source; the bare VAE encode);
- ``forward``: noise, timesteps, text encoder, UNet and loss (`training.step.batch_loss`: with
  its config-driven pieces: offset noise, caption dropout, per-image loss scales);
- ``backward``: ``loss.backward()``;
- ``optimizer``: the optimizer step (the trainer's: both models' optimizers and schedulers, the
  grad scaler, gradient-norm logging at its log steps, the counters and the resume point);
- ``rest``: everything else in the step: the data loader (the bare side is fed decoded batches),
  the components' hooks (progress bar, TensorBoard, checkpoint policy) and the loop's own work.

Prints the median and mean milliseconds of each part for both sides and their difference, then
the trainer's hooks and loader alone. Single steps in turn keep both sides on the same machine
state; each switch costs both sides some cache misses, so the ``rest`` row reads a little high
(`bench_overhead.py`'s blocks of whole epochs are the figure judged against its target).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
import training.loop
import training.sources
from bench.bare_loop import PHASES, BareLoop
from bench.bench_overhead import add_trainer_arguments, bare_batches, decode_epochs, trainer_flags
from bench.trainer_harness import BenchmarkFinished, build_run_from_flags, train_with_hook
from training.components.base import Hooks
from training.context import TrainingContext

PARTS = (*PHASES, "rest", "step")
EXTRAS = ("hooks", "loader")


class TrainerClock:
    """The seconds of the trainer's parts in the current step, from wrappers around them."""

    def __init__(self) -> None:
        self.on = True  # off while the bare loop runs inside the trainer's hook
        self.current: defaultdict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.on:
                    self.current[part] += time.perf_counter() - started

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        parts, self.current = dict(self.current), defaultdict(float)
        return parts


def instrument(clock: TrainerClock) -> None:
    """Wrap the functions the trainer's step calls for each part (this process only)."""
    clock.wrap(training.sources.PixelSource, "latents", "latents")
    clock.wrap(training.loop, "batch_loss", "forward")
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(training.loop.Trainer, "_optimizer_step", "optimizer")
    for hook in ("step_start", "step_end", "optimizer_step", "epoch_start", "epoch_end"):
        clock.wrap(Hooks, hook, "hooks")
    original = training.loop.Trainer._batches

    def timed_batches(trainer: training.loop.Trainer) -> Iterator[Any]:
        batches = original(trainer)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            clock.current["loader"] += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    training.loop.Trainer._batches = timed_batches  # type: ignore[method-assign]


def measure(args: argparse.Namespace) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(trainer parts, bare parts) of ``args.steps`` steps each, one of each in turn."""
    clock = TrainerClock()
    with tempfile.TemporaryDirectory(prefix="bench_phases_") as tmp:
        epochs = args.warmup + args.steps + 1  # an epoch has a batch at least: enough to outlast
        run, accelerator = build_run_from_flags(trainer_flags(args, Path(tmp), "phases", epochs))
        bare = BareLoop(run, bare_batches(run, decode_epochs(run, 4)), None)
        bare.run_steps(args.warmup)
        instrument(clock)
        trainer_rows: list[dict[str, float]] = []
        bare_rows: list[dict[str, float]] = []
        hook = _alternate(clock, bare, args, trainer_rows, bare_rows)
        train_with_hook(run, accelerator, hook)
    return trainer_rows, bare_rows


def _alternate(
    clock: TrainerClock,
    bare: BareLoop,
    args: argparse.Namespace,
    trainer_rows: list[dict[str, float]],
    bare_rows: list[dict[str, float]],
) -> Callable[[TrainingContext], None]:
    """The step hook: record the trainer's step, run and record one bare step."""
    state = {"count": 0, "since": time.perf_counter()}

    def hook(_: TrainingContext) -> None:
        entered = time.perf_counter()
        state["count"] += 1
        parts = clock.take()
        parts["step"] = entered - state["since"]
        if state["count"] > args.warmup:
            trainer_rows.append(_with_rest(parts))
        clock.on = False
        phases: dict[str, float] = {}
        started = time.perf_counter()
        bare.step(phases)
        phases["step"] = time.perf_counter() - started
        clock.on = True
        if state["count"] > args.warmup:
            bare_rows.append(_with_rest(phases))
        if len(trainer_rows) == args.steps:
            raise BenchmarkFinished
        # This hook runs inside the trainer's optimizer_step hooks, whose wrapper adds the
        # hook's own time to the next step's "hooks" when it returns: taken off beforehand.
        state["since"] = time.perf_counter()
        clock.current["hooks"] -= state["since"] - entered

    return hook


def _with_rest(parts: dict[str, float]) -> dict[str, float]:
    parts["rest"] = parts["step"] - sum(parts.get(name, 0.0) for name in PHASES)
    return parts


def print_table(trainer: list[dict[str, float]], bare: list[dict[str, float]]) -> None:
    print(f"{len(trainer)} steps each side, one trainer step and one bare step in turn; ms")
    print(
        f"{'part':<10} {'trainer':>8} {'bare':>8} {'diff':>7} | {'means: trainer':>14} "
        f"{'bare':>8} {'diff':>7}"
    )
    for part in PARTS:
        t = [row.get(part, 0.0) * 1000 for row in trainer]
        b = [row.get(part, 0.0) * 1000 for row in bare]
        tm, bm = statistics.median(t), statistics.median(b)
        ta, ba = statistics.fmean(t), statistics.fmean(b)
        print(
            f"{part:<10} {tm:>8.2f} {bm:>8.2f} {tm - bm:>+7.2f} | {ta:>14.2f} {ba:>8.2f} "
            f"{ta - ba:>+7.2f}"
        )
    for extra in EXTRAS:
        values = [row.get(extra, 0.0) * 1000 for row in trainer]
        print(
            f"trainer {extra} (in rest): median {statistics.median(values):.2f}, mean "
            f"{statistics.fmean(values):.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_trainer_arguments(parser)
    parser.add_argument("--steps", type=int, default=700, help="timed steps of each side")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer, bare = measure(args)
    print_table(trainer, bare)


if __name__ == "__main__":
    main()
