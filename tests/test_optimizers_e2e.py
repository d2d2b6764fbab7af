"""The memory-saving optimizers train end to end and resume exactly."""

from __future__ import annotations

import pytest
import torch

from tests.e2e import checkpoints, run, trained_weights, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_two_n_steps_equal_n_plus_resume_plus_n(tmp_path, name):
    optimizer = {"base": {"optimizer": name, "lr": 1e-4, "lr_scheduler": "cosine"}}
    keys = {"max_epochs": 2, "save_every_n_epochs": 1, "save_optimizer": True}
    straight = write_config(tmp_path / "straight", optimizer, **keys)
    assert run(straight) == 0
    (middle,) = checkpoints(tmp_path / "straight", "myproj-")
    resumed = write_config(tmp_path / "resumed", optimizer, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (full,) = checkpoints(tmp_path / "straight", "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    start = trained_weights(middle)
    a, b = trained_weights(full), trained_weights(continued)
    assert any(not torch.equal(a[k], start[k]) for k in a), f"{name} did not train"
    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the resumed run differs"
