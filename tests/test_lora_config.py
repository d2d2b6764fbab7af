"""The lora_* keys of train.json: values, defaults, flags and the rules between them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import models
import training.build
from config.cli import build_parser, parse_command_line
from config.errors import ConfigError
from config.load import load_train_config
from config.train_config import GROUPS
from lora.settings import LoraSettings, lora_settings
from tests.e2e import run, write_config


def load(tmp_path: Path, *flags: str, **keys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"resume_ckpt": "tiny-sd15", **keys}))
    return load_train_config(parse_command_line(["--config", str(path), *flags]))


def test_defaults_are_a_full_fine_tune(tmp_path):
    config = load(tmp_path).config
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (0, None, 0.0)
    assert (config.lora_conv_rank, config.lora_conv_alpha) == (0, None)
    assert config.lora_init is None and config.lora_merge is False
    assert lora_settings(config) is None


def test_alphas_default_to_their_ranks(tmp_path):
    config = load(tmp_path, lora_rank=16, lora_conv_rank=8).config
    assert lora_settings(config) == LoraSettings(16, 16.0, 0.0, 8, 8.0)
    config = load(tmp_path, "--lora_alpha", "4", lora_rank=16, lora_dropout=0.1).config
    assert lora_settings(config) == LoraSettings(16, 4.0, 0.1, 0, 0.0)


def test_flags_and_help_section(tmp_path):
    loaded = load(tmp_path, "--lora_rank", "8", "--lora_merge", lora_rank=4)
    assert loaded.config.lora_rank == 8 and loaded.config.lora_merge is True
    assert loaded.sources["lora_rank"] == "cli"
    (section,) = [g for g in build_parser()._action_groups if g.title == GROUPS["lora"]]
    flags = {a.dest for a in section._group_actions}
    assert flags == {
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_conv_rank",
        "lora_conv_alpha",
        "lora_init",
        "lora_merge",
        "lora_base_dtype",
    }


BAD = [
    ({"lora_rank": -1}, "lora_rank: must be >= 0, got -1"),
    ({"lora_rank": 4.5}, "lora_rank: expected a whole number"),
    ({"lora_rank": 5000}, "lora_rank: must be <= 1024"),
    ({"lora_rank": 4, "lora_alpha": 0}, "lora_alpha: must be > 0, got 0"),
    ({"lora_rank": 4, "lora_dropout": 1}, "lora_dropout: must be < 1, got 1"),
    ({"lora_rank": 4, "lora_conv_alpha": -2}, "lora_conv_alpha: must be > 0"),
    ({"lora_conv_rank": 4}, "lora_conv_rank: needs LoRA, which is off; set lora_rank"),
    ({"lora_init": "x.safetensors"}, "lora_init: needs LoRA, which is off; set lora_rank"),
    ({"lora_merge": True}, "lora_merge: needs LoRA, which is off; set lora_rank"),
    ({"lora_rnak": 4}, "lora_rnak: unknown key (did you mean 'lora_rank'?)"),
]


@pytest.mark.parametrize(("keys", "fragment"), BAD)
def test_bad_lora_settings_exit_2_with_one_line_before_any_model(
    tmp_path, caplog, monkeypatch, keys, fragment
):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(training.build, "load_models", no_models)
    monkeypatch.setattr(models, "load_models", no_models)
    config = write_config(tmp_path, **keys)
    with caplog.at_level(logging.ERROR):
        assert run(config, "--dry_run") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert fragment in errors[0] and str(config) in errors[0]


def test_settings_that_do_not_apply_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load(tmp_path, lora_alpha=8, lora_dropout=0.1)
    assert "lora_alpha" in caplog.text and "lora_dropout" in caplog.text
    assert "no effect while lora_rank is 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load(tmp_path, lora_rank=4, lora_conv_alpha=2)
    assert "lora_conv_alpha: no effect while lora_conv_rank is 0" in caplog.text


def test_several_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, lora_conv_rank=2, lora_merge=True)
    assert len(caught.value.problems) == 2
