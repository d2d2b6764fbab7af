"""Trainer overhead on the CPU: the trainer's own step against a bare diffusers loop, in one run.

    .venv/bin/python bench/bench_overhead.py [--batch-size 2] [--repeats 21] [--threads 1]

The trainer side is the real thing: train.py's flags → `build_run` → `run_training` on the
bundled example images (examples/data), with train.json's built-in defaults for every key the
script does not set, its data loader (decoding the images each step in
its default number of workers), its config-driven loss pieces (offset noise, caption dropout,
latent sampling from the VAE posterior), tokenizing, the grad-scaler and NaN checks, two
optimizers and schedulers, gradient-norm logging, TensorBoard and the progress bar. It trains
``--model`` (default tiny-sd15) at ``--resolution`` with torch AdamW: the shipped optimizer.json
with ``adamw`` instead of adamw8bit (bitsandbytes' 8-bit step is ~7x slower on the CPU and would
hide the overhead).

The baseline is a bare hand-written diffusers loop doing the same work on the trainer's own
modules (with its own torch AdamW, the trainer's settings as two parameter groups, and the
same diffusers LR schedule): VAE encode (no grad) → sample × scaling factor → noise and random
timesteps → DDPMScheduler.add_noise → CLIP text encoder (trained) → UNet → MSE against the target →
backward → [clip] → optimizer.step → scheduler.step → zero_grad. It is fed the same batches
(same buckets, in the same order), decoded and tokenized beforehand: everything the trainer does
besides that work, image decoding included, counts as the trainer's overhead. Sharing the
modules keeps their memory out of the comparison: on the CPU the same model runs about 1% slower
when a process builds it early than when it builds it later (two bare loops, one on a model built
first thing, one on a model built after the trainer's: +0.9% and +1.3% in two runs of 48 blocks
each, the bare loop on the trainer's modules +0.3% and +0.9%, a second late build 0.0% and
-0.1%), and a copy of its own, built after the trainer's, gave the bare side that head start.

Both run in this process. After a warm-up, blocks of ``--steps`` optimizer steps alternate:
trainer block, bare block, trainer block, ... (``--repeats`` of each, to cancel drift on a
noisy machine). The trainer's blocks are whole stretches of its loop, epoch ends included (the
block length is rounded up to whole epochs, so every block holds the same share of them).
Variants, each a separate trainer run with its own interleaved baseline:

- ``as-run``: the trainer as configured (its loader decodes the images);
- ``predecoded``: the trainer's loader replaced by the same batches decoded beforehand (the
  rest of the trainer's overhead, without image decoding);
- ``clip``: ``clip_grad_norm 1.0`` in the trainer, and per-model clipping in the bare loop;
- ``calibration``: a second bare loop in the trainer's place: what the method reads when there is
  no overhead (order, cache and drift effects; should be about 0%).

Prints one table: median time per step and images/s of each side, and the overhead
trainer/bare - 1 three ways: "paired", the median and quartiles of the block-by-block ratios
(each trainer block against the mean of the bare blocks just before and after it, which cancels
drift and the order within a pair: the figure judged against the < 2% target); "medians", the
ratio of the median step times; "best", the ratio of the fastest blocks (noise from other
processes only ever adds time). The calibration row shows how far these read from 0 by chance.

torch runs one thread by default: on a small shared machine, two OpenMP threads stall for whole
seconds whenever another process takes a core, which no interleaving cancels.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
import training.sources
from bench.bare_loop import BareBatch, BareLoop
from bench.trainer_harness import (
    REPO,
    BenchmarkFinished,
    build_run_from_flags,
    train_with_hook,
    write_optimizer_json,
)
from data import Batch, make_loader
from training.build import Run
from training.context import TrainingContext

logger = logging.getLogger("bench_overhead")

VARIANTS = ("as-run", "predecoded", "clip", "calibration")
CLIP_VALUE = 1.0
TARGET_OVERHEAD = 0.02


@dataclass
class Interleaver:
    """The step hook: warm-up, then trainer block / bare block pairs until enough repeats."""

    bare: BareLoop
    warmup: int
    steps: int
    repeats: int
    trainer_seconds: list[float] = field(default_factory=list)
    bare_seconds: list[float] = field(default_factory=list)
    count: int = 0
    block_start: float = 0.0

    def __call__(self, ctx: TrainingContext) -> None:
        now = time.perf_counter()
        self.count += 1
        if self.count < self.warmup:
            return
        if self.count > self.warmup:
            if (self.count - self.warmup) % self.steps != 0:
                return
            self.trainer_seconds.append(now - self.block_start)
        if self.count == self.warmup:
            self.bare.run_steps(self.warmup)  # the bare loop's own warm-up
        else:
            self.bare_seconds.append(self.bare.run_steps(self.steps))
            if len(self.trainer_seconds) == self.repeats:
                raise BenchmarkFinished
        self.block_start = time.perf_counter()


def decode_epochs(run: Run, epochs: int) -> list[list[Batch]]:
    """Every batch of the first ``epochs`` epochs, as the trainer's loader yields them."""
    return [list(make_loader(run.dataset, epoch)) for epoch in range(epochs)]


def bare_batches(run: Run, epochs: list[list[Batch]]) -> list[BareBatch]:
    """The same batches for the bare loop, tokenized the usual diffusers way."""
    tokenizer = run.models.tokenizer
    result = []
    for batches in epochs:
        for batch in batches:
            ids = tokenizer(
                batch.captions,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            result.append(BareBatch(batch.pixel_values, ids))
    return result


@contextmanager
def predecoded_loader(epochs: list[list[Batch]]) -> Iterator[None]:
    """The trainer's `make_loader` replaced by batches decoded beforehand."""
    if not hasattr(training.sources, "make_loader"):
        raise SystemExit("training.sources no longer calls make_loader: update bench_overhead.py")
    original = training.sources.make_loader

    def from_memory(
        dataset: Any, epoch: int, start_batch: int = 0, *, end_epoch: int | None = None, **_: Any
    ) -> list[Batch]:
        end = epoch + 1 if end_epoch is None else end_epoch
        batches = []
        for number in range(epoch, end):  # decoded epochs are reused beyond the first ones
            first = start_batch if number == epoch else 0
            decoded = epochs[number % len(epochs)][first:]
            batches += [dataclasses.replace(b, epoch=number) for b in decoded]
        return batches

    training.sources.make_loader = from_memory  # type: ignore[assignment]
    try:
        yield
    finally:
        training.sources.make_loader = original


@dataclass(frozen=True)
class Result:
    """Seconds of each timed block, trainer side and bare side, in the order they ran."""

    variant: str
    steps: int
    batch_size: int
    trainer_seconds: list[float]
    bare_seconds: list[float]

    def step_ms(self, seconds: list[float]) -> float:
        """Median time per step."""
        return statistics.median(seconds) / self.steps * 1000

    @property
    def overhead(self) -> float:
        """Median trainer step / median bare step - 1."""
        return statistics.median(self.trainer_seconds) / statistics.median(self.bare_seconds) - 1

    @property
    def best_overhead(self) -> float:
        """Fastest trainer block / fastest bare block - 1 (a busy machine only adds time)."""
        return min(self.trainer_seconds) / min(self.bare_seconds) - 1

    def paired_quartiles(self) -> tuple[float, float, float]:
        """Quartiles of each trainer block / the mean of the bare blocks just before and after
        it - 1 (cancels drift and the order within a pair)."""
        b = self.bare_seconds
        ratios = [
            seconds / statistics.fmean(b[max(0, r - 1) : r + 1]) - 1
            for r, seconds in enumerate(self.trainer_seconds)
        ]
        low, median, high = statistics.quantiles(ratios, n=4)
        return low, median, high


def trainer_flags(args: argparse.Namespace, folder: Path, variant: str, epochs: int) -> list[str]:
    flags = [
        "--resume_ckpt",
        args.model,
        "--data_root",
        str(args.data_root),
        "--resolution",
        str(args.resolution),
        "--batch_size",
        str(args.batch_size),
        "--max_epochs",
        str(epochs),
        "--optimizer_config",
        str(write_optimizer_json(folder, "adamw")),
        "--logdir",
        str(folder / "logs"),
        "--project_name",
        f"bench-{variant}",
        "--log_step",
        str(args.log_step),
        "--loss_type",
        "mse",  # the bare loop's loss (EveryDream2's default blends in Huber)
    ]
    if variant == "clip":
        flags += ["--clip_grad_norm", str(CLIP_VALUE)]
    return flags + args.trainer_flag


def block_plan(args: argparse.Namespace, per_epoch: int) -> tuple[int, int, int]:
    """Steps per block and warm-up steps (whole epochs), and the epochs the run needs."""
    steps = per_epoch * math.ceil(args.steps / per_epoch)
    warmup = per_epoch * math.ceil(args.warmup / per_epoch)
    return steps, warmup, (warmup + steps * args.repeats) // per_epoch + 1


def measure(args: argparse.Namespace, variant: str) -> Result:
    """One row: a trainer run (or a second bare loop) interleaved with a bare loop."""
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        folder = Path(tmp)
        probe, _ = build_run_from_flags(trainer_flags(args, folder, variant, 1))
        steps, warmup, epochs = block_plan(args, probe.dataset.batches_per_epoch())
        del probe
        run, accelerator = build_run_from_flags(trainer_flags(args, folder, variant, epochs))
        decoded = decode_epochs(run, epochs if variant == "predecoded" else min(epochs, 4))
        clip = CLIP_VALUE if variant == "clip" else None
        hook = Interleaver(
            BareLoop(run, bare_batches(run, decoded), clip), warmup, steps, args.repeats
        )
        if variant == "calibration":
            other = BareLoop(run, bare_batches(run, decoded), clip)
            hook.bare.run_steps(warmup)
            other.run_steps(warmup)
            for _ in range(args.repeats):
                hook.trainer_seconds.append(other.run_steps(steps))
                hook.bare_seconds.append(hook.bare.run_steps(steps))
        elif variant == "predecoded":
            with predecoded_loader(decoded):
                train_with_hook(run, accelerator, hook)
        else:
            train_with_hook(run, accelerator, hook)
        return Result(variant, steps, args.batch_size, hook.trainer_seconds, hook.bare_seconds)


def print_table(
    args: argparse.Namespace, results: list[Result], per_epoch: int, workers: int, images: int
) -> None:
    steps = results[0].steps
    print(
        f"{args.model}, {args.resolution} px, batch {args.batch_size}, torch AdamW, fp32 on the "
        f"CPU, {torch.get_num_threads()} torch thread(s); data {images} images, {per_epoch} "
        f"batches an epoch, trainer loader workers {workers}; blocks of {steps} steps "
        f"({steps // per_epoch} epoch(s)), {args.repeats} trainer/bare pairs interleaved after "
        f"a warm-up"
    )
    print(
        "ms, img/s: median per step. overhead = trainer/bare - 1: paired = median [quartiles] "
        "of each trainer block / the bare blocks around it (judged: target < "
        f"{TARGET_OVERHEAD:.0%}); medians = median trainer step / median bare step; best = "
        "fastest trainer block / fastest bare block. calibration: a second bare loop in the "
        "trainer's place (the method's own error)"
    )
    print(
        f"{'variant':<12} {'trainer ms':>10} {'bare ms':>8} {'trainer img/s':>13} "
        f"{'bare img/s':>10} {'paired':>25} {'medians':>8} {'best':>7} {'<2%':>4}"
    )
    for r in results:
        trainer_ms, bare_ms = r.step_ms(r.trainer_seconds), r.step_ms(r.bare_seconds)
        low, median, high = r.paired_quartiles()
        paired = f"{median:+.1%} [{low:+.1%}, {high:+.1%}]"
        verdict = "PASS" if median < TARGET_OVERHEAD else "FAIL"
        if r.variant == "calibration":
            verdict = "-"
        print(
            f"{r.variant:<12} {trainer_ms:>10.1f} {bare_ms:>8.1f} "
            f"{r.batch_size / trainer_ms * 1000:>13.1f} {r.batch_size / bare_ms * 1000:>10.1f} "
            f"{paired:>25} {r.overhead:>+8.1%} {r.best_overhead:>+7.1%} {verdict:>4}"
        )


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape both sides' work (shared with `bench_phases.py`)."""
    parser.add_argument("--model", default="tiny-sd15", help="built-in model (default tiny-sd15)")
    parser.add_argument("--data-root", type=Path, default=REPO / "examples" / "data")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=14, help="untimed steps first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (1: a busy 2-core machine makes 2 OpenMP threads stall)",
    )
    parser.add_argument("--log-step", type=int, default=25, help="train.json log_step")
    parser.add_argument(
        "--trainer-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra train.py flag for the trainer side, repeatable (e.g. --trainer-flag=--seed "
        "--trainer-flag=7); it must not change the work the bare loop does",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_trainer_arguments(parser)
    parser.add_argument(
        "--steps", type=int, default=7, help="steps per block, rounded up to whole epochs"
    )
    parser.add_argument("--repeats", type=int, default=21, help="trainer/bare block pairs")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--verbose", action="store_true", help="the trainer's INFO logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        probe, _ = build_run_from_flags(trainer_flags(args, Path(tmp), "probe", 1))
        per_epoch = probe.dataset.batches_per_epoch()
        workers = probe.dataset.num_workers
        images = len(probe.dataset.images)
    results = []
    for variant in args.variants:
        print(f"measuring {variant} ...", file=sys.stderr, flush=True)
        results.append(measure(args, variant))
    print_table(args, results, per_epoch, workers, images)


if __name__ == "__main__":
    main()
