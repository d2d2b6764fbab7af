"""The memory report's optimizer-state estimate equals the real state after a step."""

from __future__ import annotations

import copy

import pytest
import torch

from models import load_models
from optimizer.config import BUILTIN, SECTION_KEYS
from optimizer.memory import model_memory, optimizer_state_bytes
from optimizer.registry import OPTIMIZERS, build_optimizer
from optimizer.schedule_free import has_eval_mode


@pytest.fixture(scope="module")
def unet():
    return load_models("tiny-sd15").unet


def real_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0
    )


CASES = [(name, 1) for name in sorted(OPTIMIZERS)] + [("prodigy", 11)]


@pytest.mark.parametrize(("name", "slice_p"), CASES)
def test_state_estimate_matches_a_real_step(unet, name, slice_p):
    model = copy.deepcopy(unet)
    values = {k: getattr(BUILTIN, k) for k in SECTION_KEYS} | {"lr": 1e-4, "slice_p": slice_p}
    optimizer, _ = build_optimizer(name, model.parameters(), values)
    if has_eval_mode(optimizer):
        optimizer.train()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_()  # Prodigy keeps no copy of parameters that are all zeros
        p.grad = torch.randn_like(p)
    optimizer.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert optimizer_state_bytes(name, shapes, slice_p) == real_state_bytes(optimizer)


def test_bytes_per_parameter_of_large_models():
    n = 10**8
    per_param = {name: optimizer_state_bytes(name, [(n,)]) / n for name in OPTIMIZERS}
    assert per_param["adamw"] == 8
    assert per_param["adamw8bit"] == pytest.approx(2.03, abs=0.01)
    assert per_param["lion"] == 4
    assert per_param["lion8bit"] == pytest.approx(1.02, abs=0.01)
    assert per_param["dadapt_adam"] == 12
    assert per_param["prodigy"] == 16
    # factored: a 10,000 x 10,000 matrix keeps rows and columns, not a full second moment
    square = [(10**4, 10**4)]
    assert optimizer_state_bytes("adafactor", square) == 2 * 10**4 * 4
    assert optimizer_state_bytes("came", square) == (4 * 10**4 + 10**8) * 4


def test_model_memory_counts_only_trainable_gradients(unet):
    model = copy.deepcopy(unet)
    total = sum(p.numel() for p in model.parameters())
    model.conv_in.requires_grad_(False)
    frozen = sum(p.numel() for p in model.conv_in.parameters())
    report = model_memory(model, "adamw")
    assert report["weights_bytes"] == 4 * total
    assert report["gradients_bytes"] == 4 * (total - frozen)
    assert report["optimizer_state_bytes"] == 8 * (total - frozen)
    assert model_memory(model, None)["optimizer_state_bytes"] == 0
