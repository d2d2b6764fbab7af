"""The validation settings file: EveryDream2's files as shipped, every mistake an exit 2 naming
file and key before any model loads, and the cadence of passes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import models
import training.build
from config.errors import ConfigError
from config.validation_config import load_validation_config
from tests.e2e import EXAMPLE_DATA, run, write_config
from training.validation.cadence import validates_after_epoch, validation_step_indices

SHIPPED = Path("/work/shared/reference/everydream2")


def shipped(name: str) -> Path:
    """One of EveryDream2's shipped files (the test is skipped where they are not)."""
    path = SHIPPED / name
    if not path.exists():
        pytest.skip("EveryDream2's reference files are not here")
    return path


def write(folder: Path, data: dict, name: str = "validation.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_everydream2_default_file_reads_as_its_defaults(tmp_path):
    path = tmp_path / "validation_default.json"
    shutil.copy(shipped("validation_default.json"), path)
    settings = load_validation_config(path)
    assert settings.validate_training and settings.holds_out
    assert settings.val_split_mode == "automatic"
    assert settings.auto_split_proportion == 0.15
    assert settings.manual_data_root is None and settings.extra == {}
    assert not settings.stabilize_training_loss and settings.stabilize_split_proportion == 0.15
    assert settings.every_n_epochs == 1 and settings.seed == 555
    assert not settings.use_relative_loss and settings.batch_size is None


def test_everydream2_coco_file_with_its_old_key_names_and_a_quoted_true(tmp_path, caplog):
    data = json.loads(shipped("cfgs/validation_coco.json").read_text(encoding="utf-8"))
    assert data["validate_training"] == "true"  # as shipped
    data["val_data_root"] = str(EXAMPLE_DATA / "stripes")  # the path changed
    with caplog.at_level(logging.WARNING):
        settings = load_validation_config(write(tmp_path, data))
    assert settings.validate_training is True and not settings.holds_out
    assert settings.manual_data_root == EXAMPLE_DATA / "stripes"
    assert settings.auto_split_proportion == 0.15  # val_split_proportion
    assert settings.stabilize_training_loss is True
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "'val_data_root' is EveryDream2's old name of 'manual_data_root'" in warnings
    assert "'val_split_proportion'" in warnings and 'the string "true" is read as true' in warnings


def test_folders_are_found_beside_the_file(tmp_path, monkeypatch):
    (tmp_path / "config" / "husky").mkdir(parents=True)
    data = {"extra_manual_datasets": {"husky": "husky"}, "validate_training": False}
    monkeypatch.chdir(tmp_path)
    settings = load_validation_config(write(tmp_path / "config", data))
    assert settings.extra == {"husky": tmp_path / "config" / "husky"}
    assert settings.evaluates_anything and not settings.holds_out


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (1, True),
        (2, True),
        (2.0, True),
        (0.5, True),
        (0.33, True),
        (1.5, False),
        (0, False),
        (-1, False),
        ("1", False),
        (200000, False),
    ],
)
def test_every_n_epochs_is_whole_or_a_fraction_below_one(tmp_path, value, accepted):
    path = write(tmp_path, {"every_n_epochs": value})
    if accepted:
        assert load_validation_config(path).every_n_epochs == value
        return
    with pytest.raises(ConfigError) as error:
        load_validation_config(path)
    assert f"{path}: every_n_epochs" in str(error.value)


BAD = [
    (
        {"validate_trainig": True},
        "validate_trainig: unknown key (did you mean 'validate_training'?)",
    ),
    ({"val_split_mode": "auto"}, 'val_split_mode: "auto" is not one of'),
    ({"auto_split_proportion": 0}, "auto_split_proportion: must be > 0"),
    ({"stabilize_split_proportion": 1.5}, "stabilize_split_proportion: must be <= 1"),
    ({"seed": -1}, "seed: must be >= 0"),
    ({"validate_training": "yes"}, "validate_training: expected true or false"),
    ({"use_relative_loss": 1}, "use_relative_loss: expected true or false"),
    ({"batch_size": 0}, "batch_size: must be >= 1"),
    (
        {"val_split_mode": "manual", "manual_data_root": "no/such/folder"},
        "manual_data_root: folder no/such/folder not found",
    ),
    ({"val_split_mode": "manual"}, "manual_data_root: val_split_mode is manual but no"),
    ({"extra_manual_datasets": ["a"]}, "extra_manual_datasets: expected an object"),
    (
        {"extra_manual_datasets": {"val": str(EXAMPLE_DATA)}},
        "extra_manual_datasets.val: the name is taken by loss/val",
    ),
    (
        {"extra_manual_datasets": {"husky": "/no/such/folder"}},
        "extra_manual_datasets.husky: folder /no/such/folder does not exist",
    ),
    ({"val_data_root": "a", "manual_data_root": "b"}, "give either 'val_data_root' or"),
]


@pytest.mark.parametrize(("data", "fragment"), BAD)
def test_bad_values_name_file_and_key(tmp_path, data, fragment):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load_validation_config(path)
    assert f"validation config {path}: " in str(error.value)
    assert fragment in str(error.value)


def test_every_problem_of_the_file_in_one_message(tmp_path):
    path = write(tmp_path, {"seed": "x", "every_n_epochs": 2.5, "bogus": 1})
    with pytest.raises(ConfigError) as error:
        load_validation_config(path)
    assert len(error.value.problems) == 3


@pytest.mark.parametrize(
    ("train_keys", "validation", "fragment"),
    [
        ({}, {"every_n_epochs": 1.5}, "every_n_epochs: expected a whole number"),
        ({}, {"val_split_mode": "manual", "manual_data_root": "gone"}, "manual_data_root"),
        ({"validation_config": "missing.json"}, None, "validation_config: missing.json not found"),
        ({}, {"auto_split_proportion": 1.0}, "leaves nothing to train on"),
    ],
)
def test_bad_validation_config_exits_2_before_any_model_loads(
    tmp_path, caplog, monkeypatch, train_keys, validation, fragment
):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the validation config was checked")

    monkeypatch.setattr(training.build, "load_models", no_models)
    monkeypatch.setattr(models, "load_models", no_models)
    keys = {"validation_config": str(tmp_path / "validation.json"), **train_keys}
    if validation is not None:
        write(tmp_path, validation)
    config = write_config(tmp_path, **keys)
    with caplog.at_level(logging.ERROR):
        assert run(config, "--dry_run") == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert fragment in error
    assert "validation" in error


@pytest.mark.parametrize(
    ("every", "steps", "indices"),
    [
        (0.5, 100, [49, 99]),
        (0.5, 7, [3, 6]),
        (0.33, 10, [3, 6, 9]),
        (0.25, 4, [0, 1, 2, 3]),
        (0.1, 3, [0, 1, 2]),
        (0.9, 5, [4]),
        (0.5, 1, [0]),
    ],
)
def test_fractions_spread_passes_over_the_epoch_ending_with_its_last_step(every, steps, indices):
    assert validation_step_indices(every, steps) == indices


def test_whole_numbers_validate_after_every_nth_epoch():
    assert [e for e in range(6) if validates_after_epoch(1, e)] == [0, 1, 2, 3, 4, 5]
    assert [e for e in range(6) if validates_after_epoch(2, e)] == [1, 3, 5]
    assert not any(validates_after_epoch(0.5, e) for e in range(6))
