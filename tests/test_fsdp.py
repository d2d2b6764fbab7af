"""FSDP2 through accelerate (gloo on the CPU): sharded training equals DDP's, checkpoints are whole
and resume exactly, and what FSDP does not run is refused with one message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config.errors import UserError
from models import load_models
from tests.e2e import (
    ADAMW,
    REPO,
    manual_validation,
    own,
    quick_prompts,
    run,
    run_folders,
    scalars,
    trained_weights,
    write_config,
)
from tests.group import FSDP, Outcome, launch_group, run_forked
from tests.test_multiprocess import relative_difference
from training.distributed import FsdpOptions, check_engine
from training.session import uses_channels_last


def launched(script: Path, *args: str) -> Outcome:
    """``script`` in two processes, launched with the shipped FSDP2 config."""
    result = launch_group(script, 2, *args, flags=FSDP)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_trains_like_ddp_saves_whole_checkpoints_and_resumes_exactly(tmp_path):
    """Two FSDP processes of batch B train as one process of batch 2B (to float rounding: the
    reduce-scatter's sums); the checkpoints are whole (folder and single file) and resume
    exactly on two FSDP processes, and on one process to float rounding."""
    keys = {
        "max_epochs": 2,
        "grad_accum": 2,
        "save_full_precision": True,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
        "validation_config": manual_validation(tmp_path),
        "sample_prompts": quick_prompts(tmp_path),
        "sample_steps": 3,
    }
    train_py = REPO / "train.py"
    sharded = write_config(tmp_path / "fsdp", ADAMW, batch_size=3, **keys)
    log = launched(train_py, "--config", str(sharded)).stderr
    assert "FSDP: unet sharded in 13 units over 2 processes" in log
    assert "FSDP: the forecast is of one unsharded process; each of the 2 processes" in log
    assert "FSDP: text_encoder sharded" in log
    assert run(write_config(tmp_path / "one", ADAMW, batch_size=6, **keys)) == 0

    (fsdp_folder,) = run_folders(tmp_path / "fsdp")
    (one_folder,) = run_folders(tmp_path / "one")
    assert sorted(p.name for p in (fsdp_folder / "samples").glob("*.png")) == sorted(
        p.name for p in (one_folder / "samples").glob("*.png")
    )
    assert scalars(fsdp_folder, "loss/val") == pytest.approx(scalars(one_folder, "loss/val"), 1e-3)
    a, b = own(tmp_path / "fsdp", "last-"), own(tmp_path / "one", "last-")
    assert a.name == b.name
    weights = trained_weights(a)
    assert weights.keys() == trained_weights(b).keys()
    assert relative_difference(weights, trained_weights(b)) < 0.02
    whole = load_models(str(a.with_name(f"{a.name}.safetensors")))  # the single file
    assert torch.equal(whole.unet.conv_in.weight, weights["unet.conv_in.weight"])

    middle = own(tmp_path / "fsdp", "myproj-ep01")
    resumed = write_config(
        tmp_path / "resumed", ADAMW, batch_size=3, **keys, resume_ckpt=str(middle)
    )
    launched(train_py, "--config", str(resumed))
    again = trained_weights(own(tmp_path / "resumed", "last-"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    alone = write_config(tmp_path / "alone", ADAMW, batch_size=6, **keys, resume_ckpt=str(middle))
    assert run(alone) == 0
    assert relative_difference(trained_weights(own(tmp_path / "alone", "last-")), weights) < 0.02


OPTIMIZER_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from optimizer.config import BUILTIN
from optimizer.registry import OPTIMIZERS, build_optimizer
from training.fsdp import _shard_model
accelerator = Accelerator(device_placement=False, mixed_precision="no", cpu=True)
mesh = init_device_mesh("cpu", (2,))
values = {{k: getattr(BUILTIN, k) for k in ("betas", "epsilon", "weight_decay", "d0", "decouple",
          "momentum", "growth_rate", "use_bias_correction", "safeguard_warmup", "slice_p")}}
values["lr"] = 1e-2


def trained(shard):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 4))
    if shard:
        _shard_model(model, mesh, True)
    optimizer, _ = build_optimizer(name, model.parameters(), values)
    if hasattr(optimizer, "train"):
        optimizer.train()
    for step in range(3):
        torch.manual_seed(step)
        model(torch.randn(8, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.full_tensor() if shard else p.detach() for p in model.parameters()]


for name, spec in OPTIMIZERS.items():
    whole = trained(False)
    try:
        sharded = trained(True)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(whole, sharded))
        outcome = "same" if same else "differs"
    except RuntimeError:
        outcome = "fails"
    if accelerator.is_main_process:
        print(f"OPTIMIZER {{name}} {{spec.shardable}} {{outcome}}", file=sys.stderr)
    dist.barrier()
accelerator.wait_for_everyone()
accelerator.end_training()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_optimizers_marked_shardable_step_shards_as_they_step_whole_weights(tmp_path):
    """Each processes' shards stepped by a shardable optimizer equal the whole weights stepped
    by it (with the same data in each process, sharding alone differs); the others fail, so
    FSDP refuses them."""
    script = tmp_path / "optimizers.py"
    script.write_text(OPTIMIZER_SCRIPT.format(repo=str(REPO)))
    log = launched(script).stderr
    outcomes = dict(
        (line.split()[1], tuple(line.split()[2:4]))
        for line in log.splitlines()
        if line.startswith("OPTIMIZER ")
    )
    assert len(outcomes) == 11
    for name, (shardable, outcome) in outcomes.items():
        assert outcome == ("same" if shardable == "True" else "fails"), name


@pytest.mark.parametrize(
    ("env", "distributed_type", "expected"),
    [
        ({}, "MULTI_GPU", None),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "MULTI_CPU", FsdpOptions()),
        ({"FSDP_VERSION": "2"}, "FSDP", FsdpOptions()),
        (
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_RESHARD_AFTER_FORWARD": "false",
            },
            "FSDP",
            FsdpOptions(reshard_after_forward=False),
        ),
        (
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP",
            },
            "FSDP",
            FsdpOptions(reshard_after_forward=False),
        ),
    ],
)
def test_an_fsdp2_launch_gives_its_options(env, distributed_type, expected):
    assert check_engine(env, distributed_type) == expected


@pytest.mark.parametrize(
    ("env", "distributed_type", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "MULTI_CPU", "fsdp_version 1: the trainer runs FSDP2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP", "fsdp_version 1"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
            "FSDP",
            "fsdp_offload_params",
        ),
        (
            {"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
            "FSDP",
            "fsdp_activation_checkpointing: use the trainer's gradient_checkpointing",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "MULTI_CPU", "asked for DEEPSPEED"),
        ({}, "XLA", "asked for XLA"),
    ],
)
def test_engines_and_fsdp_settings_the_trainer_does_not_run_are_refused(
    env, distributed_type, message
):
    with pytest.raises(UserError, match=message):
        check_engine(env, distributed_type)


def test_settings_fsdp_does_not_run_are_refused_in_one_message_before_training(
    tmp_path, monkeypatch
):
    config = write_config(
        tmp_path,
        None,  # optimizer.json's default, adamw8bit
        max_epochs=1,
        lora_rank=4,
        ema_decay_rate=0.99,
        compile_unet=True,
        vram_budget_gb=20,
    )
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    result = run_forked(config)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "FSDP (accelerate launch" in line]
    for refused in (
        "unet optimizer adamw8bit",
        "lora_rank",
        "ema_decay_rate",
        "vram_budget_gb",
        "compile_unet",
    ):
        assert refused in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_the_unet_is_channels_last_on_cuda_except_when_sharded():
    """FSDP2 refuses non-contiguous parameters (a channels-last convolution weight), measured:
    "FSDP does not support non-contiguous parameters yet"."""
    assert uses_channels_last(torch.device("cuda", 0), sharded=False)
    assert not uses_channels_last(torch.device("cuda", 0), sharded=True)
    assert not uses_channels_last(torch.device("cpu"), sharded=False)
