"""EMA (issue 10): decay, update math, interval, weight swaps, settings, bad combinations."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import models
import training.build
from config.errors import UserError
from config.train_config import TrainConfig
from tests.contexts import make_context, optimizer_step
from tests.e2e import run, write_config
from training.components.ema import EMA
from training.ema import (
    EmaSettings,
    ParameterEMA,
    decay_for_strength,
    ema_device,
    ema_settings,
    tracked_parameters,
)


def tiny_bundle() -> SimpleNamespace:
    """A "UNet" and a partly frozen "text encoder" small enough to compute by hand."""
    torch.manual_seed(0)
    text_encoder = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    text_encoder[0].requires_grad_(False)
    bundle = SimpleNamespace(unet=nn.Linear(3, 2), text_encoder=text_encoder)
    bundle.component = lambda name: getattr(bundle, name)  # as ModelBundle.component
    return bundle


def settings(**changes) -> EmaSettings:
    values = dict(
        decay=0.9,
        interval=2,
        device=torch.device("cpu"),
        device_setting="cpu",
        strength_target=None,
        total_steps=10,
        sample_trained=False,
        sample_ema=True,
        start_model=None,
    )
    return EmaSettings(**(values | changes))


def test_decay_from_strength_target_as_everydream2_computes_it():
    # EveryDream2: ema_decay_rate = ema_strength_target ** (1 / (total_steps / interval))
    assert decay_for_strength(0.1, 2, 14) == 0.1 ** (1 / (14 / 2))
    assert decay_for_strength(0.1, 2, 14) ** 7 == pytest.approx(0.1, rel=1e-12)
    assert decay_for_strength(0.05, 500, 10_000) ** 20 == pytest.approx(0.05, rel=1e-12)
    config = TrainConfig(resume_ckpt="tiny-sd15", ema_strength_target=0.1, ema_update_interval=3)
    resolved = ema_settings(config, 30, torch.device("cpu"))
    assert resolved is not None
    assert resolved.decay == 0.1 ** (1 / 10) and resolved.updates_in_run == 10
    given = TrainConfig(resume_ckpt="tiny-sd15", ema_decay_rate=0.995)
    assert ema_settings(given, 30, torch.device("cpu")).decay == 0.995
    assert ema_settings(TrainConfig(resume_ckpt="tiny-sd15"), 30, torch.device("cpu")) is None


def test_update_every_interval_matches_a_hand_computation():
    bundle = tiny_bundle()
    ctx = make_context(bundle)
    ema = EMA(settings(decay=0.9, interval=2))
    ema.on_training_start(ctx)
    live = dict(tracked_parameters(bundle, ["unet", "text_encoder"]))
    expected = {name: p.detach().clone() for name, p in live.items()}
    for step in range(1, 6):
        with torch.no_grad():  # what an optimizer step would do
            for p in live.values():
                p.add_(0.25 * step)
        ema.on_optimizer_step(ctx, optimizer_step(step))
        if step % 2 == 0:
            expected = {n: e * 0.9 + live[n].detach() * (1 - 0.9) for n, e in expected.items()}
    assert ema.updates == 2
    state = ema.state_dict()
    assert state is not None
    weights = state["weights"]
    # trainable parameters only: the frozen first layer of the text encoder is not copied
    assert sorted(weights) == sorted(live)
    assert not any(name.startswith("text_encoder.0.") for name in weights)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7)
        assert not torch.equal(weights[name], live[name].detach())


def test_other_processes_keep_no_ema():
    ema = EMA(settings())
    ctx = make_context(tiny_bundle(), main=False)
    ema.on_training_start(ctx)
    ema.on_optimizer_step(ctx, optimizer_step(2))
    assert ema.weights is None and ema.state_dict() is None and ema.sample_weights() == []


def test_swapped_in_lends_the_ema_weights_and_restores_bit_for_bit():
    bundle = tiny_bundle()
    parameters = tracked_parameters(bundle, ["unet", "text_encoder"])
    before = {n: p.detach().clone() for n, p in parameters}
    ema = ParameterEMA(parameters, torch.device("cpu"))
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.mul_(0.3).add_(1 / 3)
    averaged = {n: t.clone() for n, t in ema.state_dict().items()}
    with ema.swapped_in():
        for name, p in parameters:
            assert torch.equal(p.detach(), averaged[name])
    for name, p in parameters:
        assert torch.equal(p.detach(), before[name])
        assert torch.equal(ema.state_dict()[name], averaged[name])
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in():
        raise RuntimeError("a failure inside")
    for name, p in parameters:
        assert torch.equal(p.detach(), before[name])
        assert torch.equal(ema.state_dict()[name], averaged[name])


def test_start_weights_are_used_and_must_match():
    bundle = tiny_bundle()
    parameters = tracked_parameters(bundle, ["unet"])
    start = {name: torch.full_like(p, 2.0) for name, p in parameters}
    ema = ParameterEMA(parameters, torch.device("cpu"), start, "ema_resume_model: other")
    assert all(torch.equal(ema.state_dict()[n], start[n]) for n in start)
    assert ema.state_dict()["unet.weight"].data_ptr() == start["unet.weight"].data_ptr()  # no copy
    wrong = {**start, "unet.weight": torch.zeros(5, 3)}
    message = r"^ema_resume_model: other: not the architecture being trained: unet\.weight is "
    with pytest.raises(UserError, match=message + r"\[5, 3\] there, \[2, 3\] here"):
        ParameterEMA(parameters, torch.device("cpu"), wrong, "ema_resume_model: other")
    with pytest.raises(UserError, match=r"it has no unet\.bias"):
        ParameterEMA(parameters, torch.device("cpu"), {"unet.weight": start["unet.weight"]}, "x")


def test_ema_device_cuda_means_the_training_device():
    assert ema_device("cpu", torch.device("cuda", 1)) == torch.device("cpu")
    assert ema_device("cuda", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert ema_device("cuda", torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("nonema", "ema", "suffixes"),
    [
        (False, False, ["_ema"]),
        (True, False, [""]),
        (False, True, ["_ema"]),
        (True, True, ["", "_ema"]),
    ],
)
def test_which_weights_samples_are_drawn_with(nonema, ema, suffixes):
    config = TrainConfig(
        resume_ckpt="tiny-sd15",
        ema_decay_rate=0.9,
        ema_sample_nonema_model=nonema,
        ema_sample_ema_model=ema,
    )
    resolved = ema_settings(config, 10, torch.device("cpu"))
    component = EMA(resolved)
    component.on_training_start(make_context(tiny_bundle()))
    assert [suffix for suffix, _ in component.sample_weights()] == suffixes


BAD = [
    (
        {"ema_decay_rate": 0.99, "ema_strength_target": 0.1},
        "give ema_decay_rate or ema_strength_target, not both",
    ),
    ({"ema_strength_target": 1.0}, "ema_strength_target: must be < 1, got 1"),
    ({"ema_decay_rate": 0}, "ema_decay_rate: must be > 0, got 0"),
    ({"ema_decay_rate": 0.9, "ema_update_interval": 0}, "ema_update_interval: must be >= 1"),
    ({"ema_decay_rate": 0.9, "ema_device": "gpu"}, "is not one of: cpu, cuda"),
    ({"ema_resume_model": "tiny-sd15"}, "ema_resume_model: EMA is off"),
    ({"ema_sample_ema_model": True}, "ema_sample_ema_model: EMA is off"),
    (
        {"ema_decay_rate": 0.9, "ema_resume_model": "no/such/model"},
        "ema_resume_model: 'no/such/model' is not a built-in model",
    ),
    (
        {"ema_decay_rate": 0.9, "ema_resume_model": "findlast"},
        "ema_resume_model: findlast found no checkpoint of project 'myproj'",
    ),
]


@pytest.mark.parametrize(("keys", "fragment"), BAD)
def test_bad_ema_settings_exit_2_with_one_line_before_any_model(
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
    assert fragment in errors[0]


def test_ema_settings_while_ema_is_off_warn(tmp_path, caplog, capsys):
    config = write_config(tmp_path, ema_update_interval=10, ema_device="cuda")
    with caplog.at_level(logging.WARNING):
        assert run(config, "--dry_run") == 0
    assert "ema_update_interval" in caplog.text and "no effect while EMA is off" in caplog.text
    assert json.loads(capsys.readouterr().out)["ema"] is None


def test_dry_run_shows_the_ema_and_counts_its_memory(tmp_path, capsys):
    config = write_config(
        tmp_path, ema_strength_target=0.1, ema_update_interval=2, ema_device="cuda"
    )
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    steps = report["run"]["total_optimizer_steps"]
    ema = report["ema"]
    assert ema["decay"] == 0.1 ** (1 / (steps / 2)) and ema["decay_from"] == "ema_strength_target"
    assert ema["update_interval"] == 2 and ema["updates_in_run"] == steps // 2
    assert ema["device"] == "cpu" and ema["ema_device"] == "cuda"  # no CUDA: the training device
    assert ema["samples"] == ["ema"] and ema["start"] is None
    memory = report["memory"]
    trainable = report["unet"]["trainable_parameters"]
    trainable += report["text_encoder"]["trainable_parameters"]
    assert memory["ema"]["weights_bytes"] == 4 * trainable
    assert memory["ema"]["device"] == "cpu" and memory["ema"]["counted_in_total"]
    parts = ("unet", "text_encoder", "vae", "ema")
    assert memory["total_bytes"] == sum(memory[m]["total_bytes"] for m in parts)


def test_ema_resume_model_of_another_architecture_stops_before_the_first_step(tmp_path, caplog):
    config = write_config(tmp_path, ema_decay_rate=0.9, ema_resume_model="tiny-sd21")
    with caplog.at_level(logging.ERROR):
        assert run(config) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("ema_resume_model: tiny-sd21: not the architecture being trained")
    assert not list((tmp_path / "logs").glob("*/*-gs*"))  # no checkpoint: nothing trained
