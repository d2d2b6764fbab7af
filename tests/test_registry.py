"""The optimizer registry: real classes, exact keywords, real steps, state round-trip."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

from config.errors import UserError
from models import load_models, tokenize
from optimizer import registry
from optimizer.config import BUILTIN, SECTION_KEYS
from optimizer.registry import (
    OPTIMIZERS,
    build_optimizer,
    constructor_kwargs,
    keeping_implementation,
    optimizer_class,
)
from optimizer.schedule_free import has_eval_mode

EXPECTED_CLASSES = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "lion": "lion_pytorch.lion_pytorch.Lion",
    "lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "dadapt_adam": "dadaptation.dadapt_adam.DAdaptAdam",
    "dadapt_lion": "dadaptation.dadapt_lion.DAdaptLion",
    "dadapt_sgd": "dadaptation.dadapt_sgd.DAdaptSGD",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "adafactor": "transformers.optimization.Adafactor",
    "came": "came_pytorch.CAME.CAME",
    "adamw_schedulefree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}

# The "takes" column in docs/configuration.md, under the classes' own keyword names.
EXPECTED_KEYWORDS = {
    "adamw": {"lr", "betas", "eps", "weight_decay", "fused"},
    "adamw8bit": {"lr", "betas", "eps", "weight_decay"},
    "lion": {"lr", "betas", "weight_decay"},
    "lion8bit": {"lr", "betas", "weight_decay"},
    "dadapt_adam": {"lr", "betas", "eps", "weight_decay", "d0", "decouple", "growth_rate"},
    "dadapt_lion": {"lr", "betas", "weight_decay", "d0"},
    "dadapt_sgd": {"lr", "momentum", "weight_decay", "d0", "growth_rate"},
    "prodigy": {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "d0",
        "decouple",
        "use_bias_correction",
        "safeguard_warmup",
        "growth_rate",
        "slice_p",
    },
    "adafactor": {"lr", "weight_decay", "relative_step", "scale_parameter", "warmup_init"},
    "came": {"lr", "betas", "weight_decay"},
    "adamw_schedulefree": {"lr", "betas", "eps", "weight_decay", "warmup_steps"},
}

VALUES = {**{k: getattr(BUILTIN, k) for k in SECTION_KEYS}, "lr": 1e-3}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_models("tiny-sd15")


def unet_loss(unet: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    return unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample.pow(2).mean()


def text_encoder_loss(bundle, text_encoder: torch.nn.Module) -> torch.Tensor:
    ids = tokenize(bundle.tokenizer, ["a photo of ted"])
    return text_encoder(ids).last_hidden_state.pow(2).mean()


def test_registry_has_exactly_the_spec_names():
    assert set(OPTIMIZERS) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_class_and_keywords(name):
    cls = optimizer_class(name)
    assert f"{cls.__module__}.{cls.__name__}" == EXPECTED_CLASSES[name]
    assert set(constructor_kwargs(name, VALUES)) == EXPECTED_KEYWORDS[name]


def test_keyword_values_come_from_the_settings():
    values = {**VALUES, "betas": (0.8, 0.9), "epsilon": 1e-7, "weight_decay": 0.0}
    kwargs = constructor_kwargs("adamw", values)
    assert kwargs == {
        "lr": 1e-3,
        "betas": (0.8, 0.9),
        "eps": 1e-7,
        "weight_decay": 0.0,
        "fused": True,
    }
    assert math.isinf(constructor_kwargs("prodigy", VALUES)["growth_rate"])


def test_adamw_is_fused_and_steps_as_the_per_tensor_loop_to_float_rounding():
    """torch's fused kernel (on the CPU as on CUDA) against its default loop over tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 4))
    twin = copy.deepcopy(model)
    fused, kwargs = build_optimizer("adamw", model.parameters(), VALUES)
    assert kwargs["fused"] is True and fused.defaults["fused"] is True
    loop = torch.optim.AdamW(twin.parameters(), **(kwargs | {"fused": False}))
    for step in range(3):
        for module, optimizer in ((model, fused), (twin, loop)):
            torch.manual_seed(step)
            module(torch.randn(8, 6)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_saved_unfused_adamw_state_resumes_fused_under_the_fp16_grad_scaler():
    """A state saved by an unfused AdamW (a checkpoint from before AdamW was fused on the CPU)
    keeps the built optimizer fused: loaded as torch loads it, the grad scaler's step fails."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    unfused = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    unfused.step()
    saved = unfused.state_dict()
    assert not saved["param_groups"][0]["fused"]

    def resumed_step(keep: bool) -> torch.optim.Optimizer:
        optimizer, _ = build_optimizer("adamw", model.parameters(), VALUES)
        with keeping_implementation(optimizer) if keep else contextlib.nullcontext():
            optimizer.load_state_dict(saved)
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(2, 4)).float().sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        return optimizer

    with pytest.raises(AssertionError):
        resumed_step(keep=False)
    resumed = resumed_step(keep=True)
    assert resumed.param_groups[0]["fused"] is True
    assert resumed.state[model.weight]["step"] == 2


def test_missing_package_gives_install_hint(monkeypatch):
    spec = dataclasses.replace(OPTIMIZERS["lion"], module="not_a_module_xyz", package="xyz-pkg")
    monkeypatch.setitem(registry.OPTIMIZERS, "lion", spec)
    with pytest.raises(UserError, match="pip install xyz-pkg"):
        optimizer_class("lion")


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_each_optimizer_steps_both_models_and_state_round_trips(tiny, name):
    for which in ("unet", "text_encoder"):
        model = copy.deepcopy(getattr(tiny, which))

        def loss(m, which=which):
            return unet_loss(m) if which == "unet" else text_encoder_loss(tiny, m)

        optimizer, _ = build_optimizer(name, model.parameters(), VALUES)
        if has_eval_mode(optimizer):
            optimizer.train()
        before = [p.detach().clone() for p in model.parameters()]
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad()
        changed = sum(
            not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
        )
        assert changed > 0, f"{name} did not change {which}"

        # A copy restored from the state dict steps exactly like the original.
        twin = copy.deepcopy(model)
        twin_optimizer, _ = build_optimizer(name, twin.parameters(), VALUES)
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        if has_eval_mode(twin_optimizer):
            twin_optimizer.train()
        for m, opt in ((model, optimizer), (twin, twin_optimizer)):
            loss(m).backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b), f"{name} on {which} diverged after a state round trip"


def test_two_models_get_separate_instances_of_different_kinds(tiny):
    unet_opt, _ = build_optimizer("adamw", tiny.unet.parameters(), VALUES)
    te_opt, _ = build_optimizer("lion", tiny.text_encoder.parameters(), VALUES)
    assert unet_opt is not te_opt
    assert type(unet_opt).__name__ == "AdamW"
    assert type(te_opt).__name__ == "Lion"


def test_adafactor_follows_the_lr_schedule_and_came_gets_three_betas():
    adafactor = constructor_kwargs("adafactor", VALUES)
    assert adafactor["lr"] == 1e-3  # an external LR: Adafactor's own relative step is off
    assert not adafactor["relative_step"] and not adafactor["scale_parameter"]
    assert not adafactor["warmup_init"]
    came = constructor_kwargs("came", {**VALUES, "betas": (0.8, 0.95)})
    assert came["betas"] == (0.8, 0.95, 0.9999)
