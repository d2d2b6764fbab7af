"""``vram_budget_gb``: the activation forecast, and the cheapest savings that fit a budget."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from config.errors import UserError
from models import load_models
from tests.e2e import ADAMW, checkpoints, run, write_config
from training.activations import forward_activations, step_activations
from training.planner import GIB, Setting, Settings, forecast, plan


@pytest.fixture(scope="module")
def bundle():
    return load_models("tiny-sd15")


def real_saved_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """What a real forward pass saves for backward (parameters excepted)."""
    weights = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in weights:
            seen[id(base)] = base.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    model.eval()
    return sum(seen.values())


def unet_inputs(batch: int, size: int) -> dict[str, torch.Tensor]:
    return {
        "sample": torch.randn(batch, 4, size // 8, size // 8),
        "timestep": torch.tensor([10] * batch),
        "encoder_hidden_states": torch.randn(batch, 77, 32),
    }


@pytest.mark.parametrize(("batch", "size"), [(1, 64), (2, 128)])
def test_the_fake_pass_counts_what_a_real_pass_saves(bundle, batch, size):
    inputs = unet_inputs(batch, size)
    fake = forward_activations(bundle.unet, inputs, checkpointing=False)
    assert fake.saved_bytes == real_saved_bytes(bundle.unet, inputs)
    assert fake.recompute_bytes == 0
    assert not any(p.device.type == "meta" for p in bundle.unet.parameters())  # untouched


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing(bundle):
    one = step_activations(bundle.unet, (bundle.text_encoder,), 1, (64, 64), False, None)
    four = step_activations(bundle.unet, (bundle.text_encoder,), 4, (64, 64), False, None)
    kept = step_activations(bundle.unet, (bundle.text_encoder,), 4, (64, 64), True, None)
    assert four["unet"].saved_bytes > 3 * one["unet"].saved_bytes
    assert kept["unet"].total_bytes < four["unet"].total_bytes
    assert kept["unet"].recompute_bytes > 0
    assert not bundle.unet.is_gradient_checkpointing  # left as it was
    frozen_text = step_activations(bundle.unet, (), 1, (64, 64), False, None)
    assert "text_encoder" not in frozen_text


def test_the_forecast_runs_on_the_training_device_wherever_the_weights_are(bundle):
    """The meta device stands in for CUDA: the fake weights and inputs are made on the device
    the step runs on (weights on CUDA with inputs on the CPU failed there), and that device's
    kernels decide what is saved (its attention keeps more than the CPU's here)."""
    away = load_models("tiny-sd15").unet.to("meta")
    on_meta = step_activations(away, (), 1, (64, 64), True, None)
    for_meta = step_activations(bundle.unet, (), 1, (64, 64), True, None, torch.device("meta"))
    on_cpu = step_activations(bundle.unet, (), 1, (64, 64), True, None)
    assert on_meta == for_meta != on_cpu
    assert for_meta["unet"].recompute_bytes > on_cpu["unet"].recompute_bytes > 0


def settings(**changes) -> Settings:
    given = {
        "text_encoder_offload": False,
        "optimizers": {"unet": "adamw", "text_encoder": "adamw"},
        "fused_backward_pass": False,
        "gradient_checkpointing": False,
        "batch_size": 4,
        "grad_accum": 1,
    }
    return Settings(**(given | changes))


def setting(bundle, **changes) -> Setting:
    given = {
        "models": bundle,
        "bucket": (64, 64),
        "device": torch.device("cpu"),
        "autocast_dtype": None,
        "slice_p": {},
        "ema_bytes": 0,
        "offload_possible": False,
        "fused_possible": True,
    }
    return Setting(**(given | changes))


def test_each_saving_lowers_the_forecast_in_order(bundle):
    eight = {"optimizers": {"unet": "adamw8bit", "text_encoder": "adamw8bit"}}
    fused = eight | {"fused_backward_pass": True}
    kept = fused | {"gradient_checkpointing": True}
    split = kept | {"batch_size": 2, "grad_accum": 2}
    steps = [settings(), settings(**eight), settings(**fused), settings(**kept), settings(**split)]
    shared = setting(bundle)  # one setting: each activation pass is measured once
    totals = [forecast(s, shared)["total"] for s in steps]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    for k in range(1, len(steps)):  # a budget just above step k's forecast stops at step k
        budget = (totals[k] + 1) / GIB
        chosen, lines = plan(budget, steps[0], shared)
        assert chosen == steps[k], k
        assert len(lines) == k + 2  # as given, one line per saving, fits
    chosen, lines = plan(totals[0] / GIB + 1, steps[0], shared)
    assert chosen == steps[0] and "fits" in lines[-1]


def test_savings_that_the_run_cannot_use_are_skipped(bundle):
    given = settings(optimizers={"unet": "prodigy", "text_encoder": None})
    frozen_text = setting(bundle, offload_possible=True, fused_possible=False)
    offload = settings(optimizers=given.optimizers, text_encoder_offload=True)
    offloaded = forecast(offload, frozen_text)["total"]
    chosen, lines = plan((offloaded + 1) / GIB, given, frozen_text)
    assert chosen.text_encoder_offload and chosen.optimizers["unet"] == "prodigy"
    assert "text_encoder_offload on" in lines[1]
    with pytest.raises(UserError, match="too small") as error:
        plan(1e-6, given, frozen_text)
    assert "fused" not in str(error.value)
    assert "activations" in str(error.value) and "more than the budget" in str(error.value)


def dry_run_memory(tmp_path, capsys, **keys) -> dict:
    assert run(write_config(tmp_path, ADAMW, **keys), "--dry_run") == 0
    return json.loads(capsys.readouterr().out)


def test_the_dry_run_shows_the_activations_and_the_peak(tmp_path, capsys):
    report = dry_run_memory(tmp_path, capsys)
    memory = report["memory"]
    activations = memory["activations"]
    assert activations["bucket"] == [64, 64] and activations["batch_size"] == 2
    assert activations["unet"]["saved_bytes"] > 0 and activations["text_encoder"]["saved_bytes"]
    assert memory["peak_bytes"] == memory["total_bytes"] + activations["total_bytes"]


def test_a_budget_turns_on_savings_and_the_dry_run_shows_them(tmp_path, capsys, caplog):
    plain = dry_run_memory(tmp_path / "plain", capsys)["memory"]["peak_bytes"]
    with caplog.at_level(logging.INFO):
        report = dry_run_memory(tmp_path / "budget", capsys, vram_budget_gb=(plain - 1) / GIB)
    assert "vram_budget_gb: 8-bit optimizer state (unet adamw -> adamw8bit" in caplog.text
    assert report["unet"]["optimizer"] == "adamw8bit"
    assert report["sources"]["unet.optimizer"] == "vram_budget_gb"
    assert report["memory"]["peak_bytes"] < plain


def test_an_impossible_budget_is_one_message(tmp_path, caplog):
    assert run(write_config(tmp_path, ADAMW, vram_budget_gb=1e-6), "--dry_run") == 2
    assert "vram_budget_gb: 1e-06 GiB is too small" in caplog.text


@pytest.mark.slow
def test_a_budget_that_splits_the_batch_trains_with_accumulation(tmp_path, capsys, caplog):
    keys = {"max_epochs": 1, "gradient_checkpointing": True, "fused_backward_pass": True}
    optimizer = {"base": {"optimizer": "adamw8bit", "lr": 1e-4}}
    given = write_config(tmp_path / "given", optimizer, **keys)
    assert run(given, "--dry_run") == 0
    peak = json.loads(capsys.readouterr().out)["memory"]["peak_bytes"]
    config = write_config(tmp_path / "run", optimizer, **keys, vram_budget_gb=(peak - 1) / GIB)
    with caplog.at_level(logging.INFO):
        assert run(config) == 0
    assert "batch_size 2 -> 1, grad_accum 1 -> 2" in caplog.text
    assert "1 per process x 1 process(es) x 2 accumulation = 2 images" in caplog.text
    assert checkpoints(tmp_path / "run", "last-")
