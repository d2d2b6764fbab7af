"""Every value a run needs is checked before any work: finite, bounded numbers (issue 8),
strings without NUL/control characters/lone surrogates, paths and names within the file
system's limits."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import pytest

from config import limits
from config.cli import parse_command_line
from config.errors import ConfigError, UserError
from config.fields import Rule, field_types, rule_of, strip_optional
from config.load import load_train_config
from config.train_config import TrainConfig
from optimizer.config import OptimizerFile, OptimizerSection
from optimizer.freezing import FreezingConfig
from training.length import RunLength
from training.samples.prompts import SampleEntry, SampleFile

BASE = {"resume_ckpt": "tiny-sd15"}


def load_text(tmp_path: Path, text: str, *flags: str):
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    return load_train_config(parse_command_line(["--config", str(path), *flags]))


def load(tmp_path: Path, data: dict, *flags: str):
    return load_text(tmp_path, json.dumps({**BASE, **data}), *flags)


def problems(tmp_path: Path, data: dict, *flags: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, *flags)
    return info.value.problems


def one_problem(tmp_path: Path, data: dict, *flags: str) -> str:
    found = problems(tmp_path, data, *flags)
    assert len(found) == 1, found
    return found[0]


# --- every number has bounds ---------------------------------------------------------------

NUMERIC = (int, float)


def _numeric_fields(cls: type) -> list[tuple[str, Rule]]:
    hints = field_types(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp = strip_optional(hints[f.name])
        items = typing.get_args(tp) if typing.get_origin(tp) in (list, tuple) else (tp,)
        if any(t in NUMERIC for t in items):
            found.append((f.name, rule_of(f)))
    return found


@pytest.mark.parametrize(
    "cls", [TrainConfig, OptimizerSection, OptimizerFile, FreezingConfig, SampleFile, SampleEntry]
)
def test_every_number_has_a_minimum_and_a_maximum(cls: type) -> None:
    fields = _numeric_fields(cls)
    assert fields
    for name, rule in fields:
        assert rule.minimum is not None, name
        assert rule.maximum is not None or rule.allow_infinity, name


# --- non-finite numbers --------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e400"])
@pytest.mark.parametrize(
    "key", ["lr", "flip_p", "clip_grad_norm", "min_snr_gamma", "ckpt_every_n_minutes"]
)
def test_non_finite_numbers_in_train_json_are_refused(
    tmp_path: Path, key: str, literal: str
) -> None:
    text = f'{{"resume_ckpt": "tiny-sd15", "{key}": {literal}}}'
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    (problem,) = info.value.problems
    assert f"train.json: {key}: expected a finite number (" in problem
    assert "<= " in problem  # what is allowed


@pytest.mark.parametrize("literal", ["Infinity", "NaN", "-Infinity", "1e999"])
def test_non_finite_numbers_on_the_command_line_are_refused(tmp_path: Path, literal: str) -> None:
    problem = one_problem(tmp_path, {}, f"--lr={literal}")
    assert "command line: --lr: expected a finite number (>= 0; <= 10)" in problem


@pytest.mark.parametrize("literal", ["Infinity", "NaN"])
def test_non_finite_whole_numbers_are_refused(tmp_path: Path, literal: str) -> None:
    text = f'{{"resume_ckpt": "tiny-sd15", "batch_size": {literal}}}'
    with pytest.raises(ConfigError, match=r"batch_size: expected a whole number \(>= 1; <= 1024\)"):
        load_text(tmp_path, text)


# --- numbers too large for the machine -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"seed": 1e30}, "seed: must be <= 4294967295, got 1e+30"),
        ({"seed": 2**32}, "seed: must be <= 4294967295, got 4294967296"),
        ({"seed": -2}, "seed: must be >= -1, got -2"),
        ({"resolution": 10**12}, "resolution: must be <= 8192, got 1000000000000"),
        ({"batch_size": 1e18}, "batch_size: must be <= 1024, got 1e+18"),
        ({"max_epochs": 10**9}, "max_epochs: must be <= 100000"),
        ({"grad_accum": 5000}, "grad_accum: must be <= 1024"),
        ({"log_step": 10**10}, "log_step: must be <= 100000000"),
        ({"sample_steps": 10**10}, "sample_steps: must be <= 100000000"),
        ({"save_every_n_epochs": 10**6}, "save_every_n_epochs: must be <= 100000"),
        ({"ckpt_every_n_minutes": 1e12}, "ckpt_every_n_minutes: must be <= 1000000"),
        ({"timestep_end": 1001}, "timestep_end: must be <= 1000"),
        ({"timestep_start": 1000}, "timestep_start: must be <= 999"),
        ({"lr": 1e3}, "lr: must be <= 10"),
        ({"lr_warmup_steps": 10**12}, "lr_warmup_steps: must be <= 100000000"),
        ({"dataloader_num_workers": 10**6}, "dataloader_num_workers: must be <= 256"),
        ({"gpuid": 10**6}, "gpuid: must be <= 1023"),
        ({"keep_tags": 10**9}, "keep_tags: must be <= 10000"),
        ({"embedding_perturbation": 1e9}, "embedding_perturbation: must be <= 10"),
        ({"batch_size": 2.5}, "batch_size: expected a whole number (>= 1; <= 1024), got 2.5"),
    ],
)
def test_numbers_are_bounded(tmp_path: Path, data: dict, fragment: str) -> None:
    assert fragment in one_problem(tmp_path, data)


def test_bounds_on_the_command_line(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, {}, "--batch_size", "1e18")
    assert "command line: --batch_size: must be <= 1024, got 1e+18" in problem


def test_whole_numbers_written_as_floats_are_read_alike_in_file_and_command_line(
    tmp_path: Path,
) -> None:
    loaded = load(tmp_path, {"batch_size": 2.0, "max_epochs": 1e2}, "--grad_accum", "4.0")
    assert (loaded.config.batch_size, loaded.config.max_epochs, loaded.config.grad_accum) == (
        2,
        100,
        4,
    )
    assert isinstance(loaded.config.batch_size, int)


def test_largest_values_are_accepted(tmp_path: Path) -> None:
    data = {"seed": limits.MAX_SEED, "resolution": 8192, "batch_size": 1024, "max_epochs": 10**5}
    loaded = load(tmp_path, data)
    assert loaded.config.seed == 2**32 - 1
    assert load(tmp_path, {"seed": -1}).config.seed == -1


def test_a_number_with_thousands_of_digits_is_a_message(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="more than 4300 digits"):
        load_text(tmp_path, '{"seed": ' + "9" * 5000 + "}")
    problem = one_problem(tmp_path, {}, "--seed", "9" * 5000)
    assert "command line: --seed: expected a whole number" in problem
    problem = one_problem(tmp_path, {"seed": 10**400})
    assert "seed: must be <= 4294967295, got a 401-digit number" in problem


class Epochs:
    def __init__(self, batches: int) -> None:
        self.batches = batches

    def batches_in_epoch(self, epoch: int) -> int:
        return self.batches


def test_run_length_is_bounded() -> None:
    assert RunLength.plan(Epochs(1000), limits.MAX_EPOCHS, 1).planned_steps == limits.MAX_STEPS
    with pytest.raises(ConfigError) as info:
        RunLength.plan(Epochs(1001), limits.MAX_EPOCHS, 1)
    (problem,) = info.value.problems
    assert "max_epochs: 100000 epochs make 100100000 optimizer steps" in problem
    assert "at most 100000000" in problem


# --- optimizer.json ------------------------------------------------------------------------


def resolve_optimizer(tmp_path: Path, text: str):
    from optimizer.config import load_optimizer_config

    (tmp_path / "optimizer.json").write_text(text, encoding="utf-8")
    train = load(tmp_path, {"optimizer_config": str(tmp_path / "optimizer.json")})
    return load_optimizer_config(train)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"base": {"lr": Infinity}}', "base.lr: expected a finite number (>= 0; <= 10)"),
        ('{"base": {"betas": [0.9, NaN]}}', "base.betas[1]: expected a finite number"),
        ('{"base": {"betas": [Infinity, 0.9]}}', "base.betas[0]: expected a finite number"),
        (
            '{"text_encoder_overrides": {"weight_decay": -Infinity}}',
            "text_encoder_overrides.weight_decay: expected a finite number",
        ),
        ('{"text_encoder_lr_scale": NaN}', "text_encoder_lr_scale: expected a finite number"),
        ('{"base": {"epsilon": 1e400}}', "base.epsilon: expected a finite number"),
        ('{"base": {"growth_rate": -Infinity}}', "base.growth_rate: expected a finite number"),
        ('{"base": {"growth_rate": NaN}}', "base.growth_rate: expected a finite number"),
        ('{"base": {"lr_decay_steps": 1e18}}', "base.lr_decay_steps: must be <= 100000000"),
        ('{"base": {"slice_p": 1e9}}', "base.slice_p: must be <= 1024"),
        ('{"base": {"d0": 5}}', "base.d0: must be <= 1"),
        (
            '{"text_encoder_freezing": {"freeze_front_n_layers": -1e30}}',
            "text_encoder_freezing.freeze_front_n_layers: must be >= -1000",
        ),
    ],
)
def test_optimizer_json_numbers_are_finite_and_bounded(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_optimizer(tmp_path, text)
    (problem,) = info.value.problems
    assert fragment in problem
    assert "optimizer.json" in problem


def test_infinite_growth_rate_means_no_cap(tmp_path: Path) -> None:
    config = resolve_optimizer(tmp_path, '{"base": {"growth_rate": Infinity}}')
    assert config.unet.value("growth_rate") == math.inf
    assert config.unet.sources["growth_rate"] == "optimizer.json"


# --- strings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"project_name": "my\x00proj"}, "project_name: holds the control character '\\x00'"),
        ({"logdir": "logs\x00x"}, "logdir: holds the control character '\\x00'"),
        ({"data_root": "in\nput"}, "data_root: holds the control character '\\n'"),
        ({"lr_scheduler": "cos\x00ine"}, "lr_scheduler: holds the control character"),
        ({"run_name": "a\udcffb"}, "run_name: is not valid text: it holds '\\udcff'"),
        ({"data_root": "x" * 5000}, "data_root: is 5000 bytes long (UTF-8); a path may have at"),
        ({"data_root": "in/" + "x" * 300}, "data_root: has a folder or file name of 300 bytes"),
        ({"logdir": "a/" * 2100}, "logdir: is 4200 bytes long (UTF-8); a path may have at most"),
        ({"data_root": ""}, "data_root: expected a path, got an empty string"),
        ({"project_name": "../escape"}, "project_name: holds the path separator '/'"),
        ({"project_name": "a\\b"}, "project_name: holds the path separator '\\\\'"),
        ({"project_name": ".."}, 'project_name: ".." is not a name'),
        ({"project_name": "."}, 'project_name: "." is not a name'),
        ({"project_name": ".hidden"}, "project_name: must not start with '.'"),
        ({"project_name": ""}, "project_name: expected a name, got an empty string"),
        ({"project_name": "é" * 100}, "project_name: is 200 bytes long (UTF-8); at most 175"),
        ({"plugins": ["ok", "b\x00d"]}, "plugins[1]: holds the control character"),
    ],
)
def test_strings_are_checked(tmp_path: Path, data: dict, fragment: str) -> None:
    problem = one_problem(tmp_path, data)
    assert fragment in problem
    assert "train.json" in problem


def test_surrogate_escapes_from_the_command_line_are_refused(tmp_path: Path) -> None:
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape).
    undecodable = os.fsdecode(b"run\xff")
    problem = one_problem(tmp_path, {}, "--run_name", undecodable)
    assert "command line: --run_name: is not valid text: it holds '\\udcff'" in problem


def test_longest_accepted_project_name(tmp_path: Path) -> None:
    name = "p" * limits.MAX_PROJECT_NAME_BYTES
    assert load(tmp_path, {"project_name": name}).config.project_name == name
    problem = one_problem(tmp_path, {"project_name": name + "p"})
    assert "is 176 bytes long (UTF-8); at most 175" in problem


def test_project_name_reserve_fits_every_checkpoint_name() -> None:
    """The longest file name a run makes from project_name fits in 255 bytes (see limits)."""
    project = "p" * limits.MAX_PROJECT_NAME_BYTES
    name = f"interrupted-{project}-ep{limits.MAX_EPOCHS:02d}-gs{limits.MAX_STEPS:05d}_ema"
    pid_max = 2**22  # Linux's largest pid_max
    temporary = f".{name}.safetensors.partial-{pid_max}-{'x' * 8}"
    assert len(temporary.encode()) <= limits.NAME_MAX_BYTES
    assert limits.NAME_MAX_BYTES - len(temporary.encode()) < 10  # the reserve is not wasteful


def test_run_folder_name_fits(tmp_path: Path) -> None:
    project, run = "p" * 170, "r" * 70
    problem = one_problem(tmp_path, {"project_name": project, "run_name": run})
    assert "run_name: the run folder's name <project_name>_<timestamp>_<run_name> would be" in (
        problem
    )
    longest_run_name = limits.NAME_MAX_BYTES - limits.RUN_FOLDER_EXTRA_BYTES - len(project)
    load(tmp_path, {"project_name": project, "run_name": "r" * longest_run_name})
    # the real run folder: <project>_<YYYYmmdd-HHMMSS>_<run>, plus -NNNNNN if it existed
    folder = f"{project}_20240101-000000_{'r' * longest_run_name}-123456"
    assert len(folder) == limits.NAME_MAX_BYTES


def test_output_folders_leave_room_below_them(tmp_path: Path) -> None:
    deep = "/" + "/".join(["d" * 200] * 16)  # 3216 bytes: a valid path, but too deep to write in
    problem = one_problem(tmp_path, {"logdir": deep})
    assert "logdir: its absolute path is 3216 bytes; at most 3072 are allowed" in problem
    problem = one_problem(tmp_path, {"save_ckpt_dir": deep})
    assert "save_ckpt_dir: its absolute path is 3216 bytes" in problem
