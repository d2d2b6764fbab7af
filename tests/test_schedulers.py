"""LR schedules (docs/configuration.md): names, run-length defaults, one step per optimizer step."""

from __future__ import annotations

import pytest
import torch

from optimizer.schedulers import (
    ScheduleLength,
    build_scheduler,
    schedule_length,
    scheduler_names,
)
from training.length import optimizer_steps


def test_names_are_diffusers_names_without_piecewise_constant():
    from diffusers.optimization import SchedulerType

    expected = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
    assert scheduler_names() == expected


def test_defaults_round_down_as_everydream2():
    # EveryDream2: decay = int(steps * 1.5), warm-up = int(decay / 50)
    assert schedule_length(None, None, total_optimizer_steps=101) == ScheduleLength(3, 151)
    assert schedule_length(None, None, total_optimizer_steps=33) == ScheduleLength(0, 49)
    assert schedule_length(None, 99, 10) == ScheduleLength(1, 99)
    assert schedule_length(None, None, total_optimizer_steps=1) == ScheduleLength(0, 1)
    for steps in (1, 7, 33, 101, 999, 12345):
        decay = int(steps * 1.5)
        assert schedule_length(None, None, steps) == ScheduleLength(int(decay / 50), decay)


def test_decay_defaults_to_one_and_a_half_runs_and_warmup_to_two_percent():
    length = schedule_length(None, None, total_optimizer_steps=200)
    assert length == ScheduleLength(warmup_steps=6, decay_steps=300)


def test_explicit_values_are_kept_including_zero_warmup():
    assert schedule_length(0, 50, 200) == ScheduleLength(0, 50)
    assert schedule_length(None, 50, 200) == ScheduleLength(1, 50)


class Epochs:
    def __init__(self, *batches: int) -> None:
        self.batches = batches

    def batches_in_epoch(self, epoch: int) -> int:
        return self.batches[epoch]


def test_total_steps_restart_accumulation_windows_each_epoch():
    assert optimizer_steps(Epochs(5, 5, 5), max_epochs=3, grad_accum=2) == 9
    assert optimizer_steps(Epochs(6, 6, 6), max_epochs=3, grad_accum=2) == 9
    assert optimizer_steps(Epochs(6, 6, 6), max_epochs=3, grad_accum=1) == 18
    assert optimizer_steps(Epochs(6, 5, 4), max_epochs=3, grad_accum=2, epoch=1) == 5


def _lrs(name: str, length: ScheduleLength, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(name, optimizer, length)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_ends_near_a_quarter_of_the_peak_after_the_run():
    length = schedule_length(None, None, total_optimizer_steps=100)
    lrs = _lrs("cosine", length, 100)
    assert lrs[0] == 0.0  # warm-up starts at zero
    assert max(lrs) == pytest.approx(1.0, abs=0.01)
    assert lrs[-1] == pytest.approx(0.25, abs=0.05)


def test_constant_ignores_warmup():
    assert set(_lrs("constant", ScheduleLength(5, 10), 10)) == {1.0}


def test_warmup_rises_linearly():
    lrs = _lrs("constant_with_warmup", ScheduleLength(4, 10), 6)
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
