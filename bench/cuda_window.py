"""bench_cuda.py's step hook: the timed window of a row, and with ``--profile`` what the
optimizer steps after it spend their time on.

After the timed window (so the profiler's own cost never reaches the timings), the next
`PROFILED_STEPS` optimizer steps run under ``torch.profiler`` and one text file per row says:

- the wall time of those steps, and the GPU's busy share of it: the sum of the kernels' own
  device time over the wall time. Near 100%: the GPU is the limit; far below: the CPU (Python,
  kernel launches, synchronisations) keeps it waiting;
- the operators that took the most device time, and those that took the most CPU time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.trainer_harness import BenchmarkFinished
from training.context import TrainingContext
from training.latent_cache import LatentCache

PROFILED_STEPS = 3
ROWS = 30


class StepProfile:
    """The profiler over `PROFILED_STEPS` optimizer steps; `stop_and_write` summarises them in
    ``path``."""

    def __init__(self, path: Path, cuda: bool) -> None:
        self.path = path
        self.cuda = cuda
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._profile = profile(activities=activities)
        self._started = 0.0

    def start(self) -> None:
        self._sync()
        self._profile.__enter__()
        self._started = time.perf_counter()

    def stop_and_write(self, steps: int) -> None:
        self._sync()
        seconds = time.perf_counter() - self._started
        self._profile.__exit__(None, None, None)
        events = self._profile.key_averages()
        device_us = sum(event.self_device_time_total for event in events)
        lines = [
            f"{steps} optimizer steps in {seconds:.3f} s ({1000 * seconds / steps:.1f} ms each)",
            f"GPU busy: {100 * device_us / 1e6 / seconds:.1f}% of the wall time (kernels' own "
            "device time; near 100%: GPU-bound, far below: the CPU keeps the GPU waiting)"
            if self.cuda
            else "GPU busy: n/a (no CUDA)",
            "",
        ]
        if self.cuda:
            lines += ["By device time:", events.table("self_device_time_total", row_limit=ROWS)]
        lines += ["By CPU time:", events.table("self_cpu_time_total", row_limit=ROWS)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Window:
    """The step hook: time optimizer steps warmup+1 .. warmup+steps (then profile the next
    few, with ``profile``), then stop training."""

    warmup: int
    steps: int
    cuda: bool
    profile: StepProfile | None = None
    count: int = 0
    started: float = 0.0
    seconds: float = 0.0
    cache_active: bool = False

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, ctx: TrainingContext) -> None:
        self.count += 1
        if self.count == 1:
            self.cache_active = isinstance(ctx.env.source, LatentCache)
        if self.count == self.warmup:
            self.started = self._now()
        elif self.count == self.warmup + self.steps:
            self.seconds = self._now() - self.started
            if self.profile is None:
                raise BenchmarkFinished
            self.profile.start()
        elif self.profile is not None and self.count == self.warmup + self.steps + PROFILED_STEPS:
            self.profile.stop_and_write(PROFILED_STEPS)
            raise BenchmarkFinished
