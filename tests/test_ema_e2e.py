"""EMA runs of train.py on tiny-sd15: ``_ema`` checkpoints, exact resume, samples, start model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.e2e import checkpoints, quick_prompts, run, run_folders, trained_weights, write_config
from training.checkpointing.state import load_training_state

pytestmark = pytest.mark.slow

ADAMW = {"base": {"optimizer": "adamw"}}
# 7 optimizer steps per epoch; EMA updates at steps 3, 6, 9, 12; samples at steps 7 and 14.
KEYS = {
    "max_epochs": 2,
    "lr": 1e-3,
    "ema_decay_rate": 0.7,
    "ema_update_interval": 3,
    "save_every_n_epochs": 1,
    "save_optimizer": True,
    "sample_steps": 7,
}


def ema_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The EMA weights in a checkpoint's training state (fp32, exact)."""
    return load_training_state(checkpoint).components["ema"]["weights"]


def live_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a resumable checkpoint (fp32 copies), named as the EMA's are."""
    return {
        f"{model}.{key}": value
        for model in ("unet", "text_encoder")
        for key, value in load_file(checkpoint / "training_state" / f"{model}.safetensors").items()
    }


def plain(folder: Path, prefix: str) -> Path:
    (found,) = [p for p in checkpoints(folder, prefix) if not p.name.endswith("_ema")]
    return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """2 epochs in one run, EMA in CPU memory, samples with both weights."""
    folder = tmp_path_factory.mktemp("straight")
    config = write_config(
        folder,
        ADAMW,
        **KEYS,
        sample_prompts=quick_prompts(folder),
        ema_device="cpu",
        ema_sample_nonema_model=True,
        ema_sample_ema_model=True,
    )
    assert run(config) == 0
    return folder


@pytest.fixture(scope="module")
def resumed(straight, tmp_path_factory) -> Path:
    """The first epoch's checkpoint resumed for the second, EMA on the training device."""
    folder = tmp_path_factory.mktemp("resumed")
    middle = plain(straight, "myproj-ep01")
    config = write_config(folder, ADAMW, **KEYS, resume_ckpt=str(middle), ema_device="cuda")
    assert run(config) == 0
    return folder


def test_every_checkpoint_has_a_loadable_ema_pipeline_beside_it(straight):
    (run_folder,) = run_folders(straight)
    for name in ("myproj-ep01-gs00007", "last-myproj-ep02-gs00014"):
        assert (run_folder / name / "model_index.json").is_file()
        assert (run_folder / f"{name}_ema" / "model_index.json").is_file()
        assert (run_folder / f"{name}_ema.safetensors").is_file()
        assert not (run_folder / f"{name}_ema" / "training_state").exists()
    last = plain(straight, "last-")
    ema_folder = last.with_name(f"{last.name}_ema")
    pipe = StableDiffusionPipeline.from_pretrained(ema_folder)
    averaged, live = ema_state(last), live_state(last)
    loaded = {
        f"{model}.{key}": value
        for model in ("unet", "text_encoder")
        for key, value in getattr(pipe, model).state_dict().items()
    }
    assert {name.split(".")[0] for name in averaged} == {"unet", "text_encoder"}
    for name, value in averaged.items():
        assert torch.equal(loaded[name], value.half().float()), name  # fp16 files
    assert all(
        not torch.equal(averaged[n], live[n])
        for n in ("unet.conv_in.weight", "text_encoder.final_layer_norm.weight")
    )
    single = StableDiffusionPipeline.from_single_file(
        str(ema_folder) + ".safetensors", config=str(ema_folder)
    )
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(single.unet.state_dict()[name], value), name


def test_two_n_steps_equal_n_plus_resume_plus_n_for_the_ema_too(straight, resumed):
    full, continued = plain(straight, "last-"), plain(resumed, "last-")
    assert full.name == continued.name
    a, b = trained_weights(full), trained_weights(continued)
    assert all(torch.equal(a[k], b[k]) for k in a), "the trained weights differ"
    ema_a, ema_b = ema_state(full), ema_state(continued)
    assert ema_a.keys() == ema_b.keys() and ema_a
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), "the EMA weights differ"
    assert load_training_state(full).components["ema"]["updates"] == 4
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = (load_file(p.with_name(f"{p.name}_ema") / name) for p in (full, continued))
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_samples_are_drawn_with_both_weights_when_asked(straight):
    (run_folder,) = run_folders(straight)
    names = sorted(p.name for p in (run_folder / "samples").glob("*.png"))
    assert names == [
        "step-000007-00.png",
        "step-000007-00_ema.png",
        "step-000014-00.png",
        "step-000014-00_ema.png",
    ]
    samples = run_folder / "samples"
    trained, averaged = (samples / n for n in ("step-000014-00.png", "step-000014-00_ema.png"))
    assert trained.read_bytes() != averaged.read_bytes()


@pytest.fixture(scope="module")
def started_from_another_model(straight, tmp_path_factory) -> Path:
    """A UNet-only run whose EMA starts from the newest ``_ema`` (findlast) and never updates;
    no sample flag (EMA samples only) and no single files."""
    folder = tmp_path_factory.mktemp("from_other")
    last = plain(straight, "last-")
    old_run = folder / "logs" / "myproj_old"
    old_run.mkdir(parents=True)
    shutil.copytree(last.with_name(f"{last.name}_ema"), old_run / f"{last.name}_ema")
    config = write_config(
        folder,
        ADAMW,
        max_epochs=1,
        ema_decay_rate=0.9,
        ema_update_interval=500,
        ema_resume_model="findlast",
        disable_textenc_training=True,
        no_save_ckpt=True,
        sample_prompts=quick_prompts(folder),
        sample_steps=7,
    )
    assert run(config) == 0
    return folder


def test_ema_resume_model_starts_the_ema(started_from_another_model, straight):
    folder = started_from_another_model
    (run_folder,) = [p for p in run_folders(folder) if p.name != "myproj_old"]
    last = plain(folder, "last-")
    assert last.parent == run_folder
    ema_folder = last.with_name(f"{last.name}_ema")
    assert not last.with_name(f"{last.name}.safetensors").exists()  # no_save_ckpt
    assert not ema_folder.with_name(f"{ema_folder.name}.safetensors").exists()
    start = plain(straight, "last-")
    unet = "unet/diffusion_pytorch_model.safetensors"
    source = load_file(start.with_name(f"{start.name}_ema") / unet)
    written, live = load_file(ema_folder / unet), load_file(last / unet)
    assert all(torch.equal(written[k], source[k]) for k in source)
    assert any(not torch.equal(written[k], live[k]) for k in live)
    # the text encoder does not train: the EMA pipeline has the live one
    te = "text_encoder/model.safetensors"
    written_te, live_te = load_file(ema_folder / te), load_file(last / te)
    assert all(torch.equal(written_te[k], live_te[k]) for k in live_te)
    assert sorted(load_training_state(last).components["ema"]["weights"])[0].startswith("unet.")
    names = sorted(p.name for p in (run_folder / "samples").glob("*.png"))
    assert names == ["step-000007-00_ema.png"]
