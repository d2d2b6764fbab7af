"""--dry_run and bad input: exit 2, one message, no traceback, before any model."""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch

import models
import models.single_file
import training.build
from config.cli import parse_command_line
from config.load import load_train_config
from models.single_file import write_single_file
from optimizer.config import load_optimizer_config
from tests.e2e import REPO, run, run_subprocess, write_config
from tests.group import run_forked
from training.build import load_trainable_models
from training.report import dry_run_report

PRESETS = ["optimizer.json", "optimizerSD21.json", "optimizer_dadapt.json"]
MODEL_KEYS = {
    "optimizer",
    "class",
    "lr",
    "betas",
    "epsilon",
    "weight_decay",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_decay_steps",
    "params",
    "trainable_parameters",
}


def dry_run(capsys, config, *flags: str) -> dict:
    assert run(config, "--dry_run", *flags) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_shipped_train_json_dry_runs_with_json_on_stdout_only():
    result = run_subprocess(REPO / "train.json", "--dry_run")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["unet"]["class"] == "AdamW8bit"
    assert "INFO" in result.stderr


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_dry_runs_on_both_tiny_models(capsys, preset, model):
    report = dry_run(
        capsys,
        REPO / "train.json",
        "--optimizer_config",
        str(REPO / preset),
        "--resume_ckpt",
        model,
    )
    for name in ("unet", "text_encoder"):
        assert set(report[name]) >= MODEL_KEYS
    layers = 12 if model == "tiny-sd15" else 23
    freezing = report["text_encoder_freezing"]
    assert freezing["num_layers"] == layers
    if preset == "optimizerSD21.json":
        assert freezing["frozen_layers"] == list(range(layers - 6))
        assert freezing["embeddings_frozen"] is True
        assert freezing["final_layer_norm_frozen"] is False
    else:
        assert freezing["frozen_layers"] == []
    assert {"images", "skipped", "buckets", "steps_per_epoch"} <= set(report["data"])
    assert report["data"]["images"] == 12
    assert report["sources"]["unet.lr"] == "train.json"


def test_dry_run_values_and_sources(capsys, tmp_path):
    config = write_config(
        tmp_path,
        {"base": {"optimizer": "adamw8bit", "lr": 1e-6}, "text_encoder_lr_scale": 0.5},
        lr=None,
        max_epochs=10,
    )
    report = dry_run(capsys, config, "--lr", "2e-6")
    unet, te = report["unet"], report["text_encoder"]
    assert unet["lr"] == 2e-6 and unet["params"]["lr"] == 2e-6
    assert te["lr"] == pytest.approx(1e-6)
    assert report["sources"]["unet.lr"] == "cli"
    assert report["sources"]["text_encoder.lr"] == "scaled from base"
    assert report["sources"]["unet.betas"] == "default"
    assert unet["params"] == {"lr": 2e-6, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    steps = report["data"]["steps_per_epoch"] * 10
    assert unet["lr_decay_steps"] == steps * 3 // 2
    assert unet["lr_warmup_steps"] == unet["lr_decay_steps"] // 50  # EveryDream2: int(decay / 50)
    frozen = report["text_encoder_freezing"]
    assert frozen["trainable_parameters"] == te["trainable_parameters"]


def test_dry_run_without_text_encoder_training(capsys, tmp_path):
    report = dry_run(capsys, write_config(tmp_path), "--disable_textenc_training")
    assert report["text_encoder"] is None
    assert report["text_encoder_freezing"]["trainable_parameters"] == 0


def test_dry_run_lists_unused_keys(capsys, tmp_path):
    config = write_config(tmp_path, {"base": {"optimizer": "lion", "epsilon": 1e-8}})
    report = dry_run(capsys, config)
    assert report["unet"]["unused"] == {"epsilon": 1e-8}
    assert "eps" not in report["unet"]["params"]


BAD_INPUTS = [
    ("malformed", '{"resume_ckpt": "tiny-sd15",, }', None, "line 1, column 29"),
    ("unknown_key", {"batch_sise": 2}, None, "did you mean 'batch_size'"),
    ("wrong_type", {"lr": "fast"}, None, "lr: expected a number"),
    ("negative_lr", {"lr": -1.0}, None, "lr: must be >= 0"),
    ("scheduler", {"lr_scheduler": "cosin"}, None, "did you mean 'cosine'"),
    ("optimizer", {}, {"base": {"optimizer": "adam"}}, "base.optimizer"),
    ("betas", {}, {"base": {"betas": [0.9]}}, "base.betas: expected a list of 2 numbers"),
    ("nested_key", {}, {"text_encoder_overrides": {"weight_decai": 0}}, "weight_decay"),
    (
        "freeze_beyond",
        {},
        {"text_encoder_freezing": {"freeze_front_n_layers": 13}},
        "beyond the text encoder's 12 layers",
    ),
    (
        "contradiction",
        {},
        {"text_encoder_freezing": {"freeze_front_n_layers": 2, "unfreeze_final_n_layers": 2}},
        "contradicts",
    ),
    ("missing_data", {"data_root": "no/such/folder"}, None, "data_root"),
    ("model_typo", {"resume_ckpt": "tiny-sd1.5"}, None, "did you mean 'tiny-sd15'"),
]


@pytest.mark.parametrize(("name", "train", "optimizer", "fragment"), BAD_INPUTS)
def test_bad_input_exits_2_before_any_model_is_built(
    tmp_path, caplog, monkeypatch, name, train, optimizer, fragment
):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(training.build, "load_models", no_models)
    monkeypatch.setattr(models, "load_models", no_models)
    if isinstance(train, str):
        config = tmp_path / "train.json"
        config.write_text(train)
    else:
        config = write_config(tmp_path, optimizer, **train)
    with caplog.at_level(logging.ERROR):
        assert run(config, "--dry_run") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert fragment in errors[0]
    file_named = "optimizer.json" if optimizer is not None else str(config)
    assert file_named in errors[0] or name in ("missing_data", "model_typo")


@pytest.mark.slow
def test_user_error_shows_no_traceback(tmp_path):
    config = write_config(tmp_path, {"base": {"lr": "fast"}}, batch_size=0)
    result = run_forked(config, "--dry_run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "batch_size: must be >= 1" in result.stderr


def test_missing_config_file(tmp_path):
    assert run(tmp_path / "nope.json", "--dry_run") == 2


def test_dry_run_reports_memory_per_model(capsys, tmp_path):
    optimizer = {"base": {"optimizer": "adamw"}, "text_encoder_overrides": {"optimizer": "lion"}}
    report = dry_run(capsys, write_config(tmp_path, optimizer))
    memory = report["memory"]
    unet_params = report["unet"]["trainable_parameters"]
    te_params = report["text_encoder"]["trainable_parameters"]
    assert memory["unet"]["optimizer_state_bytes"] == 8 * unet_params
    assert memory["unet"]["gradients_bytes"] == 4 * unet_params
    assert memory["text_encoder"]["optimizer_state_bytes"] == 4 * te_params
    assert memory["vae"]["optimizer_state_bytes"] == 0
    assert memory["total_bytes"] == sum(
        memory[m]["total_bytes"] for m in ("unet", "text_encoder", "vae")
    )


def loaded_run(config) -> training.build.Run:
    """The run train.py builds from ``config`` to train it."""
    train = load_train_config(parse_command_line(["--config", str(config)]))
    return training.build.build_run(train, load_optimizer_config(train), torch.device("cpu"))


@pytest.mark.parametrize("source", ["built-in", "single file"])
def test_a_dry_run_reads_no_weights_and_reports_what_a_loaded_run_would(
    capsys, tmp_path, monkeypatch, source
):
    resume = "tiny-sd15"
    if source == "single file":
        file = tmp_path / "model.safetensors"
        resume = str(write_single_file(file, models.load_models("tiny-sd15"), False))
    config = write_config(tmp_path, resume_ckpt=resume, lora_rank=4)
    loaded = dry_run_report(loaded_run(config))

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run read tensor data")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    built = []

    def load(*args):
        built.append(load_trainable_models(*args))
        return built[-1]

    monkeypatch.setattr(training.build, "load_trainable_models", load)
    report = dry_run(capsys, config)
    bundle = built[0][0]
    assert all(
        p.is_meta for m in (bundle.unet, bundle.text_encoder, bundle.vae) for p in m.parameters()
    )
    assert report["lora"]["rank"] == 4
    assert report == json.loads(json.dumps(loaded))


def test_a_single_file_of_a_dtype_torch_lacks_is_one_message(tmp_path, monkeypatch, caplog):
    file = write_single_file(tmp_path / "model.safetensors", models.load_models("tiny-sd15"), False)
    monkeypatch.setattr(models.single_file, "_DTYPES", {})
    assert run(write_config(tmp_path, resume_ckpt=str(file)), "--dry_run") == 2
    assert f"is of dtype F16, which torch {torch.__version__} does not have" in caplog.text
