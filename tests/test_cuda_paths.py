"""What runs differently on CUDA, each option on its own: a dry run, two epochs, and a resume
from the first epoch's checkpoint that ends where the straight run ended (skipped without CUDA:
the CPU suite covers these options on the CPU; this is the list a GPU session runs first)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.e2e import (
    manual_validation,
    own,
    quick_prompts,
    run,
    run_folders,
    scalars,
    training_state,
)
from tests.e2e import write_config as write_train_json

ADAMW8BIT = {"base": {"optimizer": "adamw8bit", "lr": 1e-4}}
ADAFACTOR = {"base": {"optimizer": "adafactor", "lr": 1e-4}}
EMA = {"ema_decay_rate": 0.9, "ema_update_interval": 2}
# name -> (optimizer.json, train.json keys): each a path that the CPU never takes as on CUDA.
CASES: dict[str, tuple[dict, dict]] = {
    "adamw8bit": (ADAMW8BIT, {}),
    "fp16": (ADAMW8BIT, {"mixed_precision": "fp16"}),
    "checkpointing": (ADAMW8BIT, {"gradient_checkpointing": True}),
    "slice": (ADAMW8BIT, {"attn_type": "slice"}),
    "cache_latents": (ADAMW8BIT, {"cache_latents": True}),
    "ema_cpu": (ADAMW8BIT, {**EMA, "ema_device": "cpu"}),
    "ema_cuda": (ADAMW8BIT, {**EMA, "ema_device": "cuda"}),
    "offload": (ADAMW8BIT, {"disable_textenc_training": True, "text_encoder_offload": True}),
    "fused": (ADAFACTOR, {"fused_backward_pass": True}),
    "budget": (ADAMW8BIT, {"vram_budget_gb": 1.0}),
    "lora": (ADAMW8BIT, {"lora_rank": 4}),
    "lora_bf16_base": (ADAMW8BIT, {"lora_rank": 4, "lora_base_dtype": "bf16"}),
    "sdxl": (ADAMW8BIT, {"resume_ckpt": "tiny-sdxl"}),
    "sdxl_lora": (ADAMW8BIT, {"resume_ckpt": "tiny-sdxl", "lora_rank": 4}),
    "compile": (ADAMW8BIT, {"compile_unet": True}),
}
# How far a resumed run may end from the straight one, against the weights' size: CUDA kernels
# may sum in another order from run to run (the CPU's resume is bit for bit).
RESUME_TOLERANCE = 1e-5


def write_config(folder: Path, case: str, **keys) -> Path:
    optimizer, own = CASES[case]
    common = {
        "max_epochs": 2,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
        "mixed_precision": "bf16",
        "validation_config": manual_validation(folder.parent),
        "sample_prompts": quick_prompts(folder.parent),
        "sample_steps": 7,
    }
    return write_train_json(folder, optimizer, **(common | own | keys))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a| over every tensor."""
    assert a.keys() == b.keys()
    difference = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    return difference / sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_cuda_path_dry_runs_trains_and_resumes(tmp_path, caplog, case):
    caplog.set_level(logging.INFO)
    straight = write_config(tmp_path / "straight", case)
    assert run(straight, "--dry_run") == 0
    assert run(straight) == 0
    assert "training on CUDA device 0" in caplog.text
    (folder,) = run_folders(tmp_path / "straight")
    losses = scalars(folder, "loss/train")
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert list((folder / "samples").glob("*.png"))

    middle = own(tmp_path / "straight", "myproj-")
    resumed = write_config(tmp_path / "resumed", case, resume_ckpt=str(middle))
    assert run(resumed) == 0
    last, again = own(tmp_path / "straight", "last-"), own(tmp_path / "resumed", "last-")
    assert again.name == last.name
    assert distance(training_state(last), training_state(again)) <= RESUME_TOLERANCE
