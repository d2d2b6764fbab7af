"""optimizer.json resolution: inheritance, scaling, overrides, provenance."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from config.cli import parse_command_line
from config.errors import ConfigError, UserError
from config.load import load_train_config
from optimizer.config import load_optimizer_config

REPO = Path(__file__).resolve().parent.parent


def resolve(tmp_path: Path, optimizer: dict | None, train: dict | None = None, *flags: str):
    train_data = {"resume_ckpt": "tiny-sd15", **(train or {})}
    if optimizer is not None:
        (tmp_path / "optimizer.json").write_text(json.dumps(optimizer))
        train_data.setdefault("optimizer_config", str(tmp_path / "optimizer.json"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train_data))
    loaded = load_train_config(parse_command_line(["--config", str(path), *flags]))
    return load_optimizer_config(loaded)


def test_no_optimizer_config_gives_builtin_defaults(tmp_path):
    config = resolve(tmp_path, None)
    unet = config.unet.settings
    assert unet.optimizer == "adamw8bit"
    assert unet.betas == (0.9, 0.999)
    assert unet.weight_decay == 0.01
    assert unet.epsilon == 1e-8
    assert unet.lr == 1e-6
    assert config.unet.sources["lr"] == "default"
    assert config.text_encoder.settings.lr == 1e-6  # scale defaults to 1.0 in code
    assert config.text_encoder_lr_scale == 1.0
    assert config.apply_grad_scaler_step_tweaks is True
    assert config.log_grad_norm is True


def test_optimizer_config_null_in_train_json_is_no_file(tmp_path):
    config = resolve(tmp_path, None, {"optimizer_config": None})
    assert config.path is None
    assert config.unet.name == "adamw8bit"


def test_shipped_optimizer_json_trains_text_encoder_at_half_lr(tmp_path):
    config = resolve(tmp_path, None, {"optimizer_config": str(REPO / "optimizer.json")})
    assert config.unet.settings.lr == 1e-6
    assert config.text_encoder.settings.lr == pytest.approx(0.5e-6)
    assert config.text_encoder.sources["lr"] == "scaled from base"


def test_text_encoder_nulls_are_copied_from_base(tmp_path):
    config = resolve(
        tmp_path,
        {
            "base": {"optimizer": "lion", "betas": [0.95, 0.98], "weight_decay": 0.1},
            "text_encoder_overrides": {"optimizer": None, "betas": None},
        },
    )
    te = config.text_encoder
    assert te.name == "lion"
    assert te.settings.betas == (0.95, 0.98)
    assert te.settings.weight_decay == 0.1
    assert te.sources["betas"] == "inherited from base"
    assert te.sources["optimizer"] == "inherited from base"


def test_explicit_zero_weight_decay_on_text_encoder_stays_zero(tmp_path):
    config = resolve(
        tmp_path,
        {"base": {"weight_decay": 0.05}, "text_encoder_overrides": {"weight_decay": 0.0}},
    )
    assert config.text_encoder.settings.weight_decay == 0.0
    assert config.text_encoder.sources["weight_decay"] == "optimizer.json"


def test_explicit_zero_warmup_is_kept(tmp_path):
    config = resolve(tmp_path, {"base": {"lr_warmup_steps": 0}})
    assert config.unet.settings.lr_warmup_steps == 0
    assert config.text_encoder.settings.lr_warmup_steps == 0


def test_explicit_zero_text_encoder_lr_is_not_replaced(tmp_path):
    config = resolve(tmp_path, {"base": {"lr": 1e-5}, "text_encoder_overrides": {"lr": 0.0}})
    assert config.text_encoder.settings.lr == 0.0


def test_explicit_text_encoder_lr_survives_cli_lr_and_ignores_scale(tmp_path):
    config = resolve(
        tmp_path,
        {
            "base": {"lr": 1e-6},
            "text_encoder_overrides": {"lr": 3e-7},
            "text_encoder_lr_scale": 0.5,
        },
        None,
        "--lr",
        "2e-6",
    )
    assert config.unet.settings.lr == 2e-6
    assert config.unet.sources["lr"] == "cli"
    assert config.text_encoder.settings.lr == 3e-7
    assert config.text_encoder.sources["lr"] == "optimizer.json"


def test_scale_applies_to_copied_lr_after_main_override(tmp_path):
    config = resolve(tmp_path, {"base": {"lr": 1e-6}, "text_encoder_lr_scale": 0.25}, {"lr": 4e-6})
    assert config.unet.settings.lr == 4e-6
    assert config.unet.sources["lr"] == "train.json"
    assert config.text_encoder.settings.lr == pytest.approx(1e-6)
    assert config.text_encoder.sources["lr"] == "scaled from base"


def test_cli_beats_train_json_beats_optimizer_json(tmp_path):
    config = resolve(
        tmp_path,
        {"base": {"lr": 1e-6, "lr_scheduler": "cosine", "lr_warmup_steps": 5}},
        {"lr": 2e-6, "lr_scheduler": "linear"},
        "--lr",
        "3e-6",
    )
    assert config.unet.settings.lr == 3e-6
    assert config.unet.settings.lr_scheduler == "linear"
    assert config.unet.settings.lr_warmup_steps == 5
    assert config.unet.sources["lr_scheduler"] == "train.json"
    assert config.unet.sources["lr_warmup_steps"] == "optimizer.json"


def test_main_value_replacing_file_value_warns_with_both_values(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        resolve(tmp_path, {"base": {"lr": 1e-6}}, {"lr": 5e-6})
    assert "lr=5e-06" in caplog.text
    assert "base.lr=1e-06" in caplog.text


def test_main_value_replacing_null_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        resolve(tmp_path, {"base": {"lr": None}}, {"lr": 5e-6})
    assert "replaces" not in caplog.text


def test_misspelled_scale_alias_is_accepted_with_deprecation(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        config = resolve(tmp_path, {"base": {"lr": 2e-6}, "text_encder_lr_scale": 0.5})
    assert config.text_encoder.settings.lr == pytest.approx(1e-6)
    assert "text_encder_lr_scale' is deprecated" in caplog.text


def test_doc_block_is_ignored(tmp_path):
    config = resolve(tmp_path, {"doc": {"anything": ["goes", 1]}, "base": {"lr": 2e-6}})
    assert config.unet.settings.lr == 2e-6


def test_every_value_has_a_source(tmp_path):
    config = resolve(tmp_path, {"base": {"lr": 2e-6}})
    sources = config.sources()
    for key in ("optimizer", "lr", "betas", "epsilon", "weight_decay", "d0", "slice_p"):
        assert f"unet.{key}" in sources
        assert f"text_encoder.{key}" in sources
    assert sources["text_encoder_lr_scale"] == "default"


def test_growth_rate_defaults_to_infinity(tmp_path):
    config = resolve(tmp_path, None)
    assert math.isinf(config.unet.settings.growth_rate)


def test_adaptive_optimizer_with_small_lr_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        resolve(tmp_path, {"base": {"optimizer": "prodigy", "lr": 1e-6, "weight_decay": 0.01}})
    assert "expects lr around 0.1-1.0" in caplog.text


def test_adaptive_optimizer_with_proper_lr_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        resolve(tmp_path, {"base": {"optimizer": "dadapt_adam", "lr": 1.0, "weight_decay": 0.8}})
    assert "expects lr" not in caplog.text


def test_unused_keys_are_reported_not_rejected(tmp_path):
    config = resolve(tmp_path, {"base": {"optimizer": "lion", "epsilon": 1e-8}})
    assert config.unet.unused_keys() == ["epsilon"]
    config = resolve(tmp_path, {"base": {"optimizer": "dadapt_sgd", "no_prox": True}})
    assert config.unet.unused_keys() == ["betas", "epsilon", "no_prox"]


@pytest.mark.parametrize(
    ("optimizer", "fragment"),
    [
        ({"base": {"optimizer": "adamw9bit"}}, 'base.optimizer: "adamw9bit" is not one of'),
        ({"base": {"optimizer": "adamw9bit"}}, "did you mean 'adamw8bit'"),
        ({"base": {"lr": "fast"}}, "base.lr: expected a number"),
        ({"base": {"lr": -1e-6}}, "base.lr: must be >= 0"),
        ({"base": {"betas": [0.9]}}, "base.betas: expected a list of 2 numbers"),
        ({"base": {"betas": [0.9, 1.5]}}, "base.betas[1]: must be <= 0.999999, got 1.5"),
        ({"base": {"lr_scheduler": "cosin"}}, "did you mean 'cosine'"),
        ({"text_encoder_overrides": {"lrr": 1}}, "text_encoder_overrides.lrr: unknown key"),
        ({"text_encoder_overrides": {"lrr": 1}}, "did you mean 'lr'"),
        ({"text_encoder_lr_scael": 0.5}, "did you mean 'text_encoder_lr_scale'"),
        ({"text_encoder_freezing": {"freeze_embedings": True}}, "did you mean 'freeze_embeddings'"),
        ({"base": [1, 2]}, "base: expected an object"),
        ({"log_grad_norm": "yes"}, "log_grad_norm: expected true or false"),
    ],
)
def test_bad_optimizer_json(tmp_path, optimizer, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(tmp_path, optimizer)
    assert fragment in str(info.value)
    assert "optimizer.json" in str(info.value)


def test_all_problems_of_optimizer_json_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve(tmp_path, {"base": {"lr": "fast", "optimizer": "x"}, "bogus": 1})
    assert len(info.value.problems) == 3


def test_freezing_aliases_with_two_values_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="same key with two values"):
        resolve(
            tmp_path,
            {"text_encoder_freezing": {"unfreeze_last_n_layers": 2, "unfreeze_final_n_layers": 3}},
        )


def test_missing_optimizer_file_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "train.json"
    path.write_text(json.dumps({"resume_ckpt": "tiny-sd15", "optimizer_config": "opt.json"}))
    loaded = load_train_config(parse_command_line(["--config", str(path)]))
    with pytest.raises(UserError) as info:
        load_optimizer_config(loaded)
    assert str(tmp_path / "opt.json") in str(info.value)
    assert str(tmp_path / "cfg" / "opt.json") in str(info.value)


def test_relative_optimizer_file_found_next_to_train_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "opt.json").write_text(json.dumps({"base": {"lr": 7e-6}}))
    path = tmp_path / "cfg" / "train.json"
    path.write_text(json.dumps({"resume_ckpt": "tiny-sd15", "optimizer_config": "opt.json"}))
    loaded = load_train_config(parse_command_line(["--config", str(path)]))
    assert load_optimizer_config(loaded).unet.settings.lr == 7e-6


def test_cli_optimizer_config_beats_train_json(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"base": {"optimizer": "lion"}}))
    config = resolve(
        tmp_path,
        {"base": {"optimizer": "adamw"}},
        None,
        "--optimizer_config",
        str(tmp_path / "other.json"),
    )
    assert config.unet.name == "lion"


def test_inherited_defaults_are_not_reported_unused(tmp_path):
    config = resolve(tmp_path, {"base": {"optimizer": "lion", "d0": 1e-5}})
    assert config.text_encoder.unused_keys() == ["epsilon", "d0"]
    config = resolve(tmp_path, {"base": {"optimizer": "adamw"}})
    assert config.text_encoder.unused_keys() == []


# --- Lion's betas ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lion", "lion8bit", "dadapt_lion"])
def test_lion_family_defaults_to_the_papers_betas(tmp_path, name):
    config = resolve(tmp_path, {"base": {"optimizer": name}})
    for model in (config.unet, config.text_encoder):
        assert model.settings.betas == (0.9, 0.99)
    assert config.unet.sources["betas"] == f"default for {name}"
    assert config.text_encoder.sources["betas"] == "inherited from base"
    assert "betas" not in config.unet.user_set


def test_lion_default_betas_are_used_by_the_class(tmp_path):
    from optimizer.registry import constructor_kwargs

    config = resolve(tmp_path, {"base": {"optimizer": "lion"}})
    values = {key: config.unet.value(key) for key in ("lr", "betas", "weight_decay")}
    assert constructor_kwargs("lion", values)["betas"] == (0.9, 0.99)


def test_explicit_betas_are_kept_for_lion(tmp_path):
    config = resolve(tmp_path, {"base": {"optimizer": "lion", "betas": [0.9, 0.999]}})
    assert config.unet.settings.betas == (0.9, 0.999)
    assert config.unet.sources["betas"] == "optimizer.json"
    # an explicit base value is inherited by a Lion text encoder too
    config = resolve(
        tmp_path,
        {
            "base": {"optimizer": "adamw", "betas": [0.8, 0.95]},
            "text_encoder_overrides": {"optimizer": "lion"},
        },
    )
    assert config.text_encoder.settings.betas == (0.8, 0.95)
    assert config.text_encoder.sources["betas"] == "inherited from base"


def test_each_model_gets_its_own_optimizers_default_betas(tmp_path):
    config = resolve(
        tmp_path, {"base": {"optimizer": "adamw"}, "text_encoder_overrides": {"optimizer": "lion"}}
    )
    assert config.unet.settings.betas == (0.9, 0.999)
    assert config.unet.sources["betas"] == "default"
    assert config.text_encoder.settings.betas == (0.9, 0.99)
    assert config.text_encoder.sources["betas"] == "default for lion"
    config = resolve(
        tmp_path, {"base": {"optimizer": "lion"}, "text_encoder_overrides": {"optimizer": "adamw"}}
    )
    assert config.unet.settings.betas == (0.9, 0.99)
    assert config.text_encoder.settings.betas == (0.9, 0.999)
    assert config.text_encoder.sources["betas"] == "default"
