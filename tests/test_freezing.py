"""Text-encoder freezing (docs/configuration.md) on the tiny 12- and 23-layer encoders."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from config.errors import ConfigError
from config.load import LoadedTrainConfig
from config.train_config import TrainConfig
from models import load_models, text_encoder_parts, tokenize
from optimizer.build import apply_text_encoder_freezing, build_model_training
from optimizer.config import ModelOptimizer, OptimizerConfig, resolve_optimizer_config
from optimizer.freezing import FreezingConfig, plan_freezing


@pytest.fixture(scope="module")
def sd21():
    return load_models("tiny-sd21")


@pytest.fixture(scope="module")
def sd15():
    return load_models("tiny-sd15")


def optimizer_config(freezing: dict, **train) -> OptimizerConfig:
    config = TrainConfig(resume_ckpt="tiny-sd15", **train)
    loaded = LoadedTrainConfig(config, dict.fromkeys(config.__dataclass_fields__, "default"), None)
    return resolve_optimizer_config({"text_encoder_freezing": freezing}, None, loaded)


def plan(num_layers: int, **settings):
    result, problems = plan_freezing(FreezingConfig(**settings), num_layers)
    assert result is not None, problems
    return result


def test_nothing_frozen_by_default():
    p = plan(12)
    assert p.frozen_layers == ()
    assert not p.embeddings_frozen
    assert not p.final_layer_norm_frozen


def test_positive_front_layers():
    assert plan(12, freeze_front_n_layers=3).frozen_layers == (0, 1, 2)
    assert plan(12, freeze_front_n_layers=0).frozen_layers == ()
    assert plan(12, freeze_front_n_layers=12).frozen_layers == tuple(range(12))


def test_minus_six_on_23_layers_freezes_0_to_16():
    assert plan(23, freeze_front_n_layers=-6).frozen_layers == tuple(range(17))


@pytest.mark.parametrize("n", [13, -13])
def test_beyond_layer_count_names_the_count(n):
    result, problems = plan_freezing(FreezingConfig(freeze_front_n_layers=n), 12)
    assert result is None
    assert "12 layers" in problems[0]


def test_unfreeze_final_n_layers_freezes_embeddings_too():
    p = plan(12, unfreeze_final_n_layers=2)
    assert p.frozen_layers == tuple(range(10))
    assert p.embeddings_frozen


def test_unfreeze_with_explicit_embeddings_choice():
    assert not plan(12, unfreeze_final_n_layers=2, freeze_embeddings=False).embeddings_frozen


def test_unfreeze_all_layers_leaves_embeddings_trainable():
    p = plan(12, unfreeze_final_n_layers=12)
    assert p.frozen_layers == ()
    assert not p.embeddings_frozen


def test_unfreeze_and_front_that_agree_are_fine():
    assert plan(12, unfreeze_final_n_layers=2, freeze_front_n_layers=-2).frozen_layers == tuple(
        range(10)
    )


def test_unfreeze_and_front_that_disagree_are_an_error():
    result, problems = plan_freezing(
        FreezingConfig(unfreeze_final_n_layers=2, freeze_front_n_layers=3), 12
    )
    assert result is None
    assert "contradicts freeze_front_n_layers" in problems[0]


def test_unfreeze_last_n_layers_alias():
    config = optimizer_config({"unfreeze_last_n_layers": 4})
    assert config.text_encoder_freezing.unfreeze_final_n_layers == 4


def test_beyond_layer_count_error_names_file_and_key(sd15):
    config = optimizer_config({"freeze_front_n_layers": 40})
    with pytest.raises(ConfigError) as info:
        apply_text_encoder_freezing(config, copy.deepcopy(sd15.text_encoder), True)
    assert "text_encoder_freezing.freeze_front_n_layers" in str(info.value)


def test_applied_freezing_sets_requires_grad_and_reports_counts(sd21):
    text_encoder = copy.deepcopy(sd21.text_encoder)
    config = optimizer_config(
        {"freeze_embeddings": True, "freeze_front_n_layers": -6, "freeze_final_layer_norm": False}
    )
    report = apply_text_encoder_freezing(config, text_encoder, train_text_encoder=True)
    embeddings, layers, final_norm = text_encoder_parts(text_encoder)
    assert all(not p.requires_grad for p in embeddings.parameters())
    for i, layer in enumerate(layers):
        assert all(p.requires_grad == (i >= 17) for p in layer.parameters())
    assert all(p.requires_grad for p in final_norm.parameters())
    d = report.as_dict()
    assert d["num_layers"] == 23
    assert d["frozen_layers"] == list(range(17))
    assert d["embeddings_frozen"] is True
    total = sum(p.numel() for p in text_encoder.parameters())
    assert d["trainable_parameters"] + d["frozen_parameters"] == total
    assert d["trainable_parameters"] == sum(
        p.numel() for p in text_encoder.parameters() if p.requires_grad
    )


def test_frozen_parameters_get_no_grad_and_are_not_optimized(sd15):
    text_encoder = copy.deepcopy(sd15.text_encoder)
    config = optimizer_config({"freeze_embeddings": True, "freeze_front_n_layers": 4})
    apply_text_encoder_freezing(config, text_encoder, train_text_encoder=True)
    training = build_model_training("text_encoder", text_encoder, config.text_encoder, 10, False)
    assert training is not None
    ids = tokenize(sd15.tokenizer, ["a photo of ted"])
    text_encoder(ids).last_hidden_state.sum().backward()
    embeddings, layers, _ = text_encoder_parts(text_encoder)
    frozen = list(embeddings.parameters()) + [p for layer in layers[:4] for p in layer.parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in layers[4].parameters())
    optimized = {id(p) for p in training.parameters}
    assert not any(id(p) in optimized for p in frozen)
    assert training.trainable_parameters == sum(
        p.numel() for p in text_encoder.parameters() if p.requires_grad
    )


def test_text_encoder_not_trained_is_fully_frozen_and_gets_no_optimizer(sd15):
    text_encoder = copy.deepcopy(sd15.text_encoder)
    config = optimizer_config({})
    report = apply_text_encoder_freezing(config, text_encoder, train_text_encoder=False)
    assert report.trainable_parameters == 0
    assert (
        build_model_training("text_encoder", text_encoder, config.text_encoder, 10, False) is None
    )


def test_all_parts_frozen_gets_no_optimizer(sd15):
    text_encoder = copy.deepcopy(sd15.text_encoder)
    config = optimizer_config(
        {"freeze_embeddings": True, "freeze_front_n_layers": 12, "freeze_final_layer_norm": True}
    )
    report = apply_text_encoder_freezing(config, text_encoder, train_text_encoder=True)
    assert report.trainable_parameters == 0
    assert (
        build_model_training("text_encoder", text_encoder, config.text_encoder, 10, False) is None
    )


class _Transformers4Shape(torch.nn.Module):
    """A CLIPTextModel as transformers 4.x lays it out: everything under ``text_model``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = inner


def test_layers_found_in_transformers_4_layout(sd15):
    wrapped = _Transformers4Shape(copy.deepcopy(sd15.text_encoder))
    config = optimizer_config({"freeze_front_n_layers": -2})
    report = apply_text_encoder_freezing(config, wrapped, train_text_encoder=True)
    assert report.plan.num_layers == 12
    _, layers, _ = text_encoder_parts(wrapped)
    assert not any(p.requires_grad for p in layers[9].parameters())
    assert all(p.requires_grad for p in layers[10].parameters())


def test_unet_settings_are_untouched_by_freezing():
    config = optimizer_config({"freeze_front_n_layers": 2})
    assert isinstance(config.unet, ModelOptimizer)
    assert dataclasses.asdict(config.text_encoder_freezing)["freeze_front_n_layers"] == 2
