"""Mixed precision (issue 8): the choice per device and key; every path end to end on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.e2e import (
    EXAMPLE_DATA,
    checkpoints,
    manual_validation,
    run,
    run_folders,
    scalars,
    trained_weights,
    write_config,
)
from training.checkpointing.state import STATE_DIR, STATE_TENSORS
from training.precision import choose_precision, make_grad_scaler

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 5), torch.float16),
        ((7, 0), torch.float16),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_auto_picks_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    """T4/V100/RTX 20xx emulate bf16 (torch's is_bf16_supported may say yes): they get fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision = choose_precision(CUDA, "auto", disable_amp=False)
    assert precision.dtype == expected
    assert precision.uses_grad_scaler == (expected == torch.float16)


def test_the_key_decides_on_any_device():
    assert choose_precision(CPU, "auto", False).dtype is None
    assert choose_precision(CPU, "bf16", False).dtype == torch.bfloat16
    assert choose_precision(CPU, "fp16", False).dtype == torch.float16
    assert choose_precision(CPU, "no", False).dtype is None
    assert choose_precision(CPU, "auto", disable_amp=True).dtype is None
    scaler = make_grad_scaler(choose_precision(CPU, "fp16", False))
    assert scaler.is_enabled()


def test_disable_amp_contradicting_mixed_precision_is_an_error(tmp_path):
    config = write_config(tmp_path, disable_amp=True, mixed_precision="bf16")
    assert run(config, "--dry_run") == 2


PATHS = {"bf16": torch.bfloat16, "fp16": torch.float16}
KEYS = {
    "batch_size": 4,
    "max_epochs": 2,
    "save_every_n_epochs": 1,
    "save_optimizer": True,
    "cond_dropout": 0.0,
    "flip_p": 0.0,
}
OPTIMIZER = {"base": {"optimizer": "adamw", "lr": 1e-3}}


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision", sorted(PATHS))
def test_every_mixed_precision_path_trains_saves_and_resumes_exactly(tmp_path, mixed_precision):
    """Finite loss, and a validation loss that falls at each epoch (its noise and timesteps are
    fixed: the training loss over a few steps is mostly their chance); a loadable checkpoint;
    2 epochs = 1 + resume + 1, bit for bit."""
    keys = {**KEYS, "mixed_precision": mixed_precision}
    keys["validation_config"] = manual_validation(tmp_path, EXAMPLE_DATA / "stripes")
    straight = write_config(tmp_path / "straight", OPTIMIZER, **keys)
    assert run(straight) == 0
    (folder,) = run_folders(tmp_path / "straight")
    epoch_losses = scalars(folder, "loss/epoch")
    assert len(epoch_losses) == 2 and all(torch.isfinite(torch.tensor(epoch_losses)))
    validation = scalars(folder, "loss/val")  # before training, then after each epoch
    assert len(validation) == 3 and validation[0] > validation[1] > validation[2]
    if mixed_precision == "fp16":
        assert scalars(folder, "grad_scale")  # the grad scaler ran

    (middle,) = checkpoints(tmp_path / "straight", "myproj-")
    resumed = write_config(tmp_path / "resumed", OPTIMIZER, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (full,) = checkpoints(tmp_path / "straight", "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    a, b = trained_weights(full), trained_weights(continued)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if mixed_precision == "fp16":
        older = unfused_copy(middle, tmp_path / "older" / middle.name)
        again = write_config(tmp_path / "again", OPTIMIZER, **keys, resume_ckpt=str(older))
        assert run(again) == 0  # resumed unfused, the grad scaler's step would fail
        (other,) = checkpoints(tmp_path / "again", "last-")
        c = trained_weights(other)  # the saved flag chose nothing: the straight run's weights
        assert all(torch.equal(a[k], c[k]) for k in a)

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(full)
    assert all(torch.isfinite(p).all() for p in pipeline.unet.parameters())


def unfused_copy(checkpoint: Path, copy: Path) -> Path:
    """``checkpoint`` as a checkpoint of a run with unfused AdamW states holds it (one written
    before AdamW was fused on the CPU)."""
    shutil.copytree(checkpoint, copy)
    state_file = copy / STATE_DIR / STATE_TENSORS
    tensors = torch.load(state_file, weights_only=True)
    for optimizer in tensors["optimizers"].values():
        for group in optimizer["param_groups"]:
            assert group["fused"] is True
            group["fused"] = None
    torch.save(tensors, state_file)
    return copy
