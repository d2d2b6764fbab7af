"""train.json + command line: types, precedence, provenance and error messages."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from config.cli import build_parser, parse_command_line
from config.errors import ConfigError, UserError
from config.load import find_input_file, load_train_config
from config.train_config import TrainConfig


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def load(tmp_path: Path, data: dict | None = None, *flags: str):
    argv = list(flags)
    if data is not None:
        argv = ["--config", str(write_json(tmp_path / "train.json", data)), *argv]
    return load_train_config(parse_command_line(argv))


BASE = {"resume_ckpt": "tiny-sd15"}


def test_every_train_json_key_is_a_flag_of_the_same_name():
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags


def test_everydream2_keys_are_recognised(tmp_path):
    ed2 = {
        "amp": True,
        "batch_size": 10,
        "ckpt_every_n_minutes": None,
        "clip_grad_norm": None,
        "clip_skip": 0,
        "cond_dropout": 0.04,
        "data_root": "input",
        "disable_amp": False,
        "disable_textenc_training": False,
        "disable_xformers": False,
        "flip_p": 0.0,
        "gpuid": 0,
        "gradient_checkpointing": True,
        "grad_accum": 1,
        "logdir": "logs",
        "log_step": 25,
        "lowvram": False,
        "lr": 1.5e-06,
        "lr_decay_steps": 0,
        "lr_scheduler": "constant",
        "lr_warmup_steps": None,
        "max_epochs": 30,
        "notebook": False,
        "optimizer_config": "optimizer.json",
        "project_name": "abc",
        "resolution": 512,
        "resume_ckpt": "tiny-sd15",
        "sample_prompts": "sample_prompts.txt",
        "sample_steps": 300,
        "save_ckpt_dir": None,
        "save_ckpts_from_n_epochs": 0,
        "save_every_n_epochs": 20,
        "save_optimizer": False,
        "scale_lr": False,
        "seed": 555,
        "shuffle_tags": False,
        "validation_config": None,
        "wandb": False,
        "write_schedule": False,
        "rated_dataset": False,
        "rated_dataset_target_dropout_percent": 50,
        "zero_frequency_noise_ratio": 0.02,
        "enable_zero_terminal_snr": False,
        "load_settings_every_epoch": False,
        "min_snr_gamma": None,
        "ema_decay_rate": None,
        "ema_strength_target": None,
        "ema_update_interval": None,
        "ema_device": None,
        "ema_sample_nonema_model": False,
        "ema_sample_ema_model": False,
        "ema_resume_model": None,
        "pyramid_noise_discount": None,
        "timestep_start": 0,
        "timestep_end": 1000,
        "keep_tags": 0,
        "embedding_perturbation": 0.0,
        "loss_type": "mse",
        "no_prepend_last": False,
        "no_save_ckpt": False,
        "run_name": None,
        "save_full_precision": False,
        "useadam8bit": False,
        "attn_type": "sdp",
        "disable_unet_training": False,
        "plugins": None,
    }
    loaded = load(tmp_path, ed2)
    assert loaded.config.batch_size == 10
    assert loaded.config.lr_decay_steps is None  # EveryDream2's 0 = automatic
    assert loaded.config.ema_update_interval == 500  # null = default


def test_precedence_default_then_file_then_cli(tmp_path):
    loaded = load(tmp_path, {**BASE, "batch_size": 4, "max_epochs": 7}, "--max_epochs", "9")
    assert loaded.config.batch_size == 4
    assert loaded.config.max_epochs == 9
    assert loaded.config.resolution == 512
    assert loaded.sources["batch_size"] == "train.json"
    assert loaded.sources["max_epochs"] == "cli"
    assert loaded.sources["resolution"] == "default"


def test_cli_alone_without_train_json(tmp_path):
    loaded = load(tmp_path, None, "--resume_ckpt", "tiny-sd21", "--lr", "2e-6")
    assert loaded.config.resume_ckpt == "tiny-sd21"
    assert loaded.config.lr == 2e-6
    assert loaded.path is None


def test_boolean_flags(tmp_path):
    data = {**BASE, "gradient_checkpointing": True, "shuffle_tags": False}
    loaded = load(tmp_path, data, "--shuffle_tags", "--gradient_checkpointing", "false")
    assert loaded.config.shuffle_tags is True
    assert loaded.config.gradient_checkpointing is False


def test_null_means_not_set_and_zero_is_a_value(tmp_path):
    data = {**BASE, "batch_size": None, "lr_warmup_steps": 0, "flip_p": 0.0, "seed": 0}
    loaded = load(tmp_path, data)
    assert loaded.config.batch_size == 2
    assert loaded.sources["batch_size"] == "default"
    assert loaded.config.lr_warmup_steps == 0
    assert loaded.config.seed == 0


def test_cli_null_is_not_set(tmp_path):
    loaded = load(tmp_path, {**BASE, "lr": 1e-5}, "--lr", "null")
    assert loaded.config.lr == 1e-5  # null on the CLI is "not set": train.json's value stays
    assert loaded.sources["lr"] == "train.json"


def test_unknown_key_in_train_json_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {**BASE, "batch_sise": 3})
    message = str(info.value)
    assert "train.json" in message
    assert "batch_sise" in message
    assert "did you mean 'batch_size'" in message


def test_unknown_flag_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, BASE, "--max_epoch", "3")
    assert "--max_epoch" in str(info.value)
    assert "did you mean '--max_epochs'" in str(info.value)


def test_all_problems_of_a_file_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {**BASE, "lr": "fast", "batch_size": 0, "loss_type": "msee", "x": 1})
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    assert 'lr: expected a number (>= 0; <= 10), got "fast"' in text
    assert "batch_size: must be >= 1" in text
    assert "did you mean 'mse'" in text


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"lr": -1e-6}, "lr: must be >= 0"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"batch_size": 1.5}, "batch_size: expected a whole number"),
        ({"shuffle_tags": "yes"}, "shuffle_tags: expected true or false"),
        ({"lr_scheduler": "cosin"}, "did you mean 'cosine'"),
        ({"resolution": 500}, "resolution: must be a multiple of 64"),
        ({"timestep_start": 900, "timestep_end": 100}, "must be below timestep_end"),
        ({"resume_ckpt": None}, "resume_ckpt: required"),
        ({"flip_p": 1.5}, "flip_p: must be <= 1"),
    ],
)
def test_bad_values(tmp_path, data, fragment):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {**BASE, **data})
    assert fragment in str(info.value)
    assert "train.json" in str(info.value)


def test_bad_cli_value_names_the_flag(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, BASE, "--lr", "fast")
    assert "command line: --lr: expected a number" in str(info.value)


def test_malformed_json_gives_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{\n  "batch_size": 2,\n  "lr": 1e-6,,\n}')
    with pytest.raises(UserError) as info:
        load_train_config(parse_command_line(["--config", str(path)]))
    assert str(path) in str(info.value)
    assert "line 3, column" in str(info.value)


def test_missing_train_json(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_train_config(parse_command_line(["--config", str(tmp_path / "nope.json")]))


def test_top_level_must_be_an_object(tmp_path):
    with pytest.raises(UserError, match="expected a JSON object"):
        load(tmp_path, [1, 2])  # type: ignore[arg-type]


def test_deprecated_key_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load(tmp_path, {**BASE, "disable_xformers": True})
    assert "disable_xformers is deprecated" in caplog.text


# Every flag of EveryDream2's current argument parser (train.py), and the keys its shipped
# presets hold besides (ed1_mode, lowvram, scale_lr, notebook, useadam8bit, disable_xformers).
EVERYDREAM2_PARSER_KEYS = (
    "amp",
    "attn_type",
    "batch_size",
    "ckpt_every_n_minutes",
    "clip_grad_norm",
    "clip_skip",
    "cond_dropout",
    "data_root",
    "disable_amp",
    "disable_textenc_training",
    "disable_unet_training",
    "embedding_perturbation",
    "flip_p",
    "gpuid",
    "gradient_checkpointing",
    "grad_accum",
    "logdir",
    "log_step",
    "loss_type",
    "lr",
    "lr_decay_steps",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_epochs",
    "no_prepend_last",
    "no_save_ckpt",
    "optimizer_config",
    "plugins",
    "project_name",
    "resolution",
    "resume_ckpt",
    "run_name",
    "sample_prompts",
    "sample_steps",
    "save_ckpt_dir",
    "save_every_n_epochs",
    "save_ckpts_from_n_epochs",
    "save_full_precision",
    "save_optimizer",
    "seed",
    "shuffle_tags",
    "timestep_start",
    "timestep_end",
    "train_sampler",
    "keep_tags",
    "wandb",
    "validation_config",
    "write_schedule",
    "rated_dataset",
    "rated_dataset_target_dropout_percent",
    "zero_frequency_noise_ratio",
    "enable_zero_terminal_snr",
    "load_settings_every_epoch",
    "min_snr_gamma",
    "ema_decay_rate",
    "ema_strength_target",
    "ema_update_interval",
    "ema_device",
    "ema_sample_nonema_model",
    "ema_sample_ema_model",
    "ema_resume_model",
    "pyramid_noise_discount",
)
EVERYDREAM2_PRESET_KEYS = (
    "ed1_mode",
    "lowvram",
    "scale_lr",
    "notebook",
    "useadam8bit",
    "disable_xformers",
)


def test_every_everydream2_key_is_a_key():
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = set(EVERYDREAM2_PARSER_KEYS + EVERYDREAM2_PRESET_KEYS) - keys
    assert not missing


@pytest.mark.parametrize(
    "data",
    [
        {"ed1_mode": True},
        {"lowvram": True},
        {"scale_lr": True},
        {"train_sampler": "ddim"},
        {"train_sampler": "pndm"},
    ],
)
def test_keys_everydream2_no_longer_uses_warn_and_do_not_stop_the_run(tmp_path, caplog, data):
    with caplog.at_level(logging.WARNING):
        loaded = load(tmp_path, {**BASE, **data})
    (key,) = data
    assert getattr(loaded.config, key) == data[key]
    assert f"train.json: {key} is deprecated and has no effect" in caplog.text


def test_everydream2_chain_presets_load(tmp_path):
    chain = Path("/work/shared/reference/everydream2/chain0.json")
    if not chain.exists():
        pytest.skip("EveryDream2's reference files are not here")
    data = json.loads(chain.read_text()) | {"resume_ckpt": "tiny-sd15"}
    assert load(tmp_path, data).config.ed1_mode is True


def test_train_sampler_takes_everydream2s_names(tmp_path):
    with pytest.raises(ConfigError, match='train_sampler: "ddmi" is not one of: ddpm, pndm'):
        load(tmp_path, {**BASE, "train_sampler": "ddmi"})


def test_train_sampler_changes_nothing_in_diffusers_training_math():
    """EveryDream2 builds DDPM, PNDM or DDIM from the model's scheduler config and calls only
    add_noise, get_velocity and alphas_cumprod: all three are the same code (PNDM has no
    get_velocity, so EveryDream2 fails with pndm on v-prediction models)."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    schedulers = [cls(**config) for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler)]
    x, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    noisy = [s.add_noise(x, noise, t) for s in schedulers]
    assert all(torch.equal(noisy[0], n) for n in noisy[1:])
    assert all(torch.equal(schedulers[0].alphas_cumprod, s.alphas_cumprod) for s in schedulers)
    velocity = [s.get_velocity(x, noise, t) for s in schedulers[:2]]
    assert torch.equal(velocity[0], velocity[1])


def test_huber_mse_loss_is_accepted(tmp_path):
    assert load(tmp_path, {**BASE, "loss_type": "huber_mse"}).config.loss_type == "huber_mse"


def test_xformers_attention_is_read_as_sdp(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load(tmp_path, {**BASE, "attn_type": "xformers"})
    assert loaded.config.attn_type == "sdp"
    assert "attn_type is xformers" in caplog.text


def test_input_file_found_next_to_train_json(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "optimizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    found = find_input_file("optimizer.json", folder, "optimizer_config")
    assert found == folder / "optimizer.json"


def test_input_file_in_working_directory_wins(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "optimizer.json").write_text("{}")
    (tmp_path / "optimizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert find_input_file("optimizer.json", folder, "optimizer_config") == Path("optimizer.json")


def test_missing_input_file_names_both_places(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        find_input_file("opt.json", folder, "optimizer_config")
    assert str(tmp_path / "opt.json") in str(info.value)
    assert str(folder / "opt.json") in str(info.value)
