"""Validation with two processes (gloo on the CPU) gives the one-process values."""

from __future__ import annotations

import json

import pytest

from tests.e2e import ADAMW, EXAMPLE_DATA, run, run_folders, scalars, write_config
from tests.test_multiprocess import launch

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_processes_share_the_passes_and_log_the_one_process_loss(tmp_path):
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"val_split_mode": "manual", "batch_size": 2,
                                      "manual_data_root": str(EXAMPLE_DATA)}))  # fmt: skip
    keys = {"max_epochs": 1, "validation_config": str(validation)}
    two = write_config(tmp_path / "two", ADAMW, batch_size=2, **keys)
    one = write_config(tmp_path / "one", ADAMW, batch_size=4, **keys)
    result = launch(two, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert run(one) == 0
    (two_folder,) = run_folders(tmp_path / "two")
    (one_folder,) = run_folders(tmp_path / "one")
    two_values, one_values = scalars(two_folder, "loss/val"), scalars(one_folder, "loss/val")
    assert len(two_values) == len(one_values) == 2
    # before training the weights are the same: only the summation order differs
    assert two_values[0] == pytest.approx(one_values[0], rel=1e-6)
    # after an epoch the weights differ by the all-reduce's float rounding
    assert two_values[1] == pytest.approx(one_values[1], rel=1e-3)
