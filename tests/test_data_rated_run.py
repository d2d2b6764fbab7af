"""A rated dataset end to end: train.json keys accepted, epochs of different lengths trained in
full, the LR schedule sized by their sum."""

from __future__ import annotations

import json
import math

import pytest

from tests.data_fixtures import load
from tests.e2e import EXAMPLE_DATA, run, run_folders, scalars, write_config

RATED = {"rated_dataset": True, "rated_dataset_target_dropout_percent": 0, "max_epochs": 4}


def _expected_steps() -> list[int]:
    """Batches of each epoch (grad_accum does not change them without batch ids)."""
    dataset = load(EXAMPLE_DATA, batch_size=2, seed=555, **RATED)
    return [dataset.batches_in_epoch(epoch) for epoch in range(4)]


def test_dry_run_sizes_the_schedule_by_every_epoch(capsys, tmp_path):
    config = write_config(tmp_path, None, grad_accum=2, **RATED)
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    steps = _expected_steps()
    assert steps[0] == steps[1] > steps[2] > steps[3]  # 12, 12, 9 and 6 images
    assert report["data"]["steps_by_epoch"] == steps
    assert report["data"]["steps_in_run"] == sum(steps)
    assert report["run"]["total_optimizer_steps"] == sum(math.ceil(n / 2) for n in steps)


@pytest.mark.slow
def test_a_rated_run_trains_every_epoch_in_full(tmp_path):
    config = write_config(tmp_path, {"base": {"optimizer": "adamw", "lr": 1e-4}}, **RATED)
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    assert len(scalars(folder, "loss/train")) == sum(_expected_steps())
