"""train.py with validation_config for real: EveryDream2's files as shipped, every tag at its
cadence, training unchanged by validation, exact resume with validation on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.e2e import EXAMPLE_DATA, checkpoints, run, run_folders, trained_weights, write_config

pytestmark = pytest.mark.slow

SHIPPED = Path("/work/shared/reference/everydream2")
# EveryDream2's train.json with the model, data and paths changed (and a checkpoint to resume)
CHANGES = {
    "resume_ckpt": "tiny-sd15",
    "data_root": str(EXAMPLE_DATA),
    "resolution": 64,
    "max_epochs": 2,
    "save_every_n_epochs": 1,
    "save_optimizer": True,
}


def events(run_folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar series."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_folder))
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def everydream2_folder(folder: Path, **changes: object) -> Path:
    """EveryDream2's train.json, optimizer.json, sample_prompts.txt and
    validation_default.json in ``folder``, train.json changed as CHANGES says."""
    if not (SHIPPED / "validation_default.json").exists():
        pytest.skip("EveryDream2's reference files are not here")
    folder.mkdir(parents=True)
    for name in ("optimizer.json", "sample_prompts.txt", "validation_default.json"):
        shutil.copy(SHIPPED / name, folder / name)
    data = json.loads((SHIPPED / "train.json").read_text(encoding="utf-8"))
    data |= CHANGES | {"logdir": str(folder / "logs")} | changes
    path = folder / "train.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def everydream2(tmp_path_factory, monkeypatch_module):
    """A straight run of EveryDream2's shipped files, and one resumed from its epoch-1 point."""
    root = tmp_path_factory.mktemp("everydream2")
    monkeypatch_module.chdir(root)  # the shipped paths are relative to train.json's folder
    straight = everydream2_folder(root / "straight")
    assert run(straight) == 0
    (middle,) = checkpoints(root / "straight", "project_abc-ep01")
    resumed = everydream2_folder(root / "resumed", resume_ckpt=str(middle))
    assert run(resumed) == 0
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_everydream2_files_as_shipped_log_val_before_training_and_each_epoch(everydream2):
    (folder,) = run_folders(everydream2 / "straight")
    (last,) = checkpoints(everydream2 / "straight", "last-")
    steps = int(last.name.rsplit("-gs", 1)[1])
    values = events(folder, "loss/val")
    assert [step for step, _ in values] == [0, steps // 2, steps]
    assert all(0 < value < 10 for _, value in values)
    assert events(folder, "loss/train-stabilized") == []  # off in validation_default.json
    config = json.loads((folder / "config.json").read_text())
    assert config["validation"]["sets"]["val"]["images"] == 2
    assert config["data"]["images"] == 10


def test_resume_with_validation_is_exact_and_logs_no_second_pretrain_value(everydream2):
    (full,) = checkpoints(everydream2 / "straight", "last-")
    (continued,) = checkpoints(everydream2 / "resumed", "last-")
    assert full.name == continued.name
    a, b = trained_weights(full), trained_weights(continued)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the straight run"
    (straight_folder,) = run_folders(everydream2 / "straight")
    (resumed_folder,) = run_folders(everydream2 / "resumed")
    assert events(resumed_folder, "loss/val") == events(straight_folder, "loss/val")[-1:]


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory):
    """The same training without validation and with every kind of set, several passes per
    epoch, relative losses and cached latents."""
    root = tmp_path_factory.mktemp("with_and_without")
    extra = root / "stars"
    extra.mkdir()
    for name in ("orange_star.png", "orange_star.yaml"):
        shutil.copy(EXAMPLE_DATA / name, extra / name)
    validation = root / "validation.json"
    validation.write_text(
        json.dumps(
            {
                "val_split_mode": "manual",
                "manual_data_root": str(EXAMPLE_DATA / "stripes"),
                "extra_manual_datasets": {"stars": str(extra)},
                "stabilize_training_loss": True,
                "every_n_epochs": 0.5,
                "use_relative_loss": True,
            }
        )
    )
    keys = {"cache_latents": True, "save_full_precision": True}
    assert run(write_config(root / "without", **keys)) == 0
    assert run(write_config(root / "with", **keys, validation_config=str(validation))) == 0
    return root


def test_validation_does_not_change_training(with_and_without):
    (a,) = checkpoints(with_and_without / "without", "last-")
    (b,) = checkpoints(with_and_without / "with", "last-")
    wa, wb = trained_weights(a), trained_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "validation changed the trained weights"


@pytest.mark.parametrize("name", ["val", "stars", "train-stabilized", "_all_val_combined"])
def test_every_set_is_logged_several_times_per_epoch(with_and_without, name):
    (folder,) = run_folders(with_and_without / "with")
    values = events(folder, f"loss/{name}")
    # 7 steps per epoch, every_n_epochs 0.5: after steps 4 and 7 of each epoch
    assert [step for step, _ in values] == [0, 4, 7, 11, 14]
    assert values[0][1] == 0.0  # use_relative_loss: minus the pre-training value
    assert any(value != 0.0 for _, value in values[1:])
