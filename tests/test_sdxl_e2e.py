"""SDXL end to end: train.py trains ``tiny-sdxl`` (full and LoRA), resumes exactly, writes what
diffusers loads, and trains on from an SDXL single file in the public layout.

One straight full run (2 epochs, a resumable checkpoint after 1, EMA, validation, samples and
the schedule on, the second encoder with its own LR) and its resumed run are shared by the
tests that only read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file

from data.buckets import crop_offset
from models import load_models
from models.builtin import build_builtin
from models.single_file import write_single_file
from tests.e2e import (
    REPO,
    assert_same_weights,
    checkpoints,
    quick_prompts,
    run,
    run_folders,
    write_config,
)

pytestmark = pytest.mark.slow

COSINE = {
    "base": {"optimizer": "adamw", "lr": 1e-4, "lr_scheduler": "cosine"},
    "text_encoder_2_overrides": {"lr": 5e-5},
}
RUN = {
    "resume_ckpt": "tiny-sdxl",
    "max_epochs": 2,
    "save_every_n_epochs": 1,
    "save_optimizer": True,
    "grad_accum": 2,
    "ema_decay_rate": 0.9,
    "ema_update_interval": 1,
    "write_schedule": True,
    "sample_steps": 6,
}


def _validation(folder: Path) -> str:
    path = folder / "validation.json"
    path.write_text(json.dumps({"validate_training": True, "auto_split_proportion": 0.2}))
    return str(path)


def last(folder: Path) -> Path:
    """The run's own last checkpoint (not the ``_ema`` one beside it)."""
    (found,) = [p for p in checkpoints(folder, "last-") if not p.name.endswith("_ema")]
    return found


def state_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The exact (fp32) trained weights a checkpoint keeps for resuming."""
    state = checkpoint / "training_state"
    return {
        f"{file.stem}.{key}": value
        for file in sorted(state.glob("*.safetensors"))
        for key, value in load_file(file).items()
    }


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The straight run's folder and the run resumed from its epoch-1 checkpoint."""
    root = tmp_path_factory.mktemp("sdxl")
    keys = {**RUN, "validation_config": _validation(root), "sample_prompts": quick_prompts(root)}
    straight = write_config(root / "straight", COSINE, **keys)
    assert run(straight) == 0
    middle = next(p for p in checkpoints(root / "straight", "myproj-") if "ep01" in p.name)
    resumed = write_config(root / "resumed", COSINE, **{**keys, "resume_ckpt": str(middle)})
    assert run(resumed) == 0
    return root / "straight", root / "resumed"


def test_sdxl_resume_is_exact(full_runs):
    straight, resumed = full_runs
    full = last(straight)
    continued = last(resumed)
    assert full.name == continued.name
    a, b = state_weights(full), state_weights(continued)
    assert {key.split(".")[0] for key in a} == {"unet", "text_encoder"}
    assert any(key.startswith("text_encoder.text_encoder_2.") for key in a)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the straight run"
    ema_full = full.with_name(f"{full.name}_ema")
    ema_continued = continued.with_name(f"{continued.name}_ema")
    left = load_file(ema_full / "unet" / "diffusion_pytorch_model.safetensors")
    right = load_file(ema_continued / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_sdxl_trains_both_encoders(full_runs):
    straight, _ = full_runs
    final = last(straight)
    trained = StableDiffusionXLPipeline.from_pretrained(str(final))
    base = build_builtin("tiny-sdxl")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        before = dict(getattr(base, name).named_parameters())
        changed = [
            n
            for n, p in getattr(trained, name).named_parameters()
            if not torch.equal(p.detach().float(), before[n].detach().half().float())
        ]
        assert changed, f"{name} did not train"


def test_sdxl_dry_run_shows_both_encoders(capsys, tmp_path):
    config = write_config(tmp_path, COSINE, resume_ckpt="tiny-sdxl")
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["family"] == "sdxl"
    assert report["model"]["text_encoder_layers"] == 12
    assert report["model"]["text_encoder_2_layers"] == 32
    bundle = build_builtin("tiny-sdxl")
    assert report["model"]["parameters"] == {
        name: sum(p.numel() for p in getattr(bundle, name).parameters())
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")
    }
    assert report["text_encoder_freezing"]["num_layers"] == 12
    assert report["text_encoder_2_freezing"]["num_layers"] == 32
    groups = report["text_encoder"]["param_groups"]
    assert [group["lr"] for group in groups] == [1e-4, 5e-5]
    assert (
        sum(g["trainable_parameters"] for g in groups)
        == report["text_encoder"]["trainable_parameters"]
    )
    assert report["sources"]["text_encoder_2.lr"] == "optimizer.json"
    assert report["sources"]["text_encoder_2.weight_decay"] == "inherited from text_encoder"
    assert report["memory"]["activations"]["unet"]["saved_bytes"] > 0


def test_sdxl_folder_and_single_file_load_in_diffusers_with_equal_weights(full_runs):
    straight, _ = full_runs
    final = last(straight)
    folder = StableDiffusionXLPipeline.from_pretrained(str(final))
    single = StableDiffusionXLPipeline.from_single_file(
        str(final.with_name(f"{final.name}.safetensors")), config=str(final)
    )
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert_same_weights(getattr(folder, name), getattr(single, name))


def test_sdxl_schedule_shows_each_images_size_and_crop(full_runs):
    straight, _ = full_runs
    (folder,) = run_folders(straight)[:1]
    schedule = json.loads((folder / "schedule-ep001.txt").read_text())
    items = [item for batch in schedule["batches"] for item in batch["images"]]
    assert items
    for batch in schedule["batches"]:
        bucket = tuple(int(side) for side in batch["bucket"].split("x"))
        for item in batch["images"]:
            with Image.open(item["path"]) as image:
                size = ImageOps.exif_transpose(image).size
            assert tuple(item["original_size"]) == size
            assert tuple(item["crop"]) == crop_offset(size, bucket, item["flipped"])
    assert any(item["crop"] != [0, 0] for item in items)


def test_sdxl_samples_come_from_the_sdxl_pipeline(full_runs):
    straight, _ = full_runs
    (folder,) = run_folders(straight)[:1]
    images = sorted((folder / "samples").glob("*.png"))
    assert images
    with Image.open(images[0]) as image:
        assert image.size == (64, 64)


def test_an_sdxl_single_file_in_the_public_layout_trains_as_resume_ckpt(tmp_path):
    file = tmp_path / "sdxl.safetensors"
    write_single_file(file, build_builtin("tiny-sdxl"), full_precision=True)
    config = write_config(
        tmp_path / "run", {"base": {"optimizer": "adamw"}}, resume_ckpt=str(file), max_epochs=1
    )
    assert run(config) == 0
    final = last(tmp_path / "run")
    trained = load_models(str(final))
    assert trained.family == "sdxl"
    base = build_builtin("tiny-sdxl")
    assert not torch.equal(trained.unet.conv_in.weight, base.unet.conv_in.weight.half().float())


def test_sdxl_lora_trains_resumes_exactly_and_exports_kohyas_names(tmp_path):
    lora = {"lora_rank": 4, "lora_alpha": 2.0, "max_epochs": 2, "save_every_n_epochs": 1}
    keys = {**lora, "save_optimizer": True, "resume_ckpt": "tiny-sdxl"}
    optimizer = {"base": {"optimizer": "adamw", "lr": 1e-3}}
    straight = write_config(tmp_path / "straight", optimizer, **keys)
    assert run(straight) == 0
    first = next(p for p in checkpoints(tmp_path / "straight", "myproj-") if "ep01" in p.name)
    resumed = write_config(tmp_path / "resumed", optimizer, **{**keys, "resume_ckpt": str(first)})
    assert run(resumed) == 0
    a = last(tmp_path / "straight")
    b = last(tmp_path / "resumed")
    left, right = state_weights(a), state_weights(b)
    assert {key.split(".")[0] for key in left} == {
        "unet_lora",
        "text_encoder_lora",
        "text_encoder_2_lora",
    }
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)
    kohya = load_file(a.with_name(f"{a.name}.safetensors"))
    assert {key.split("_")[1] for key in kohya} == {"unet", "te1", "te2"}


@pytest.mark.parametrize("preset", ["trainSDXL.json", "trainSDXL_lora.json"])
def test_sdxl_presets_train_on_the_tiny_model(preset, capsys, tmp_path):
    """The shipped SDXL presets as they are, on tiny-sdxl at 64 px for one epoch (the dry run
    first: it shows the settings that make them fit)."""
    flags = [
        "--resume_ckpt",
        "tiny-sdxl",
        "--resolution",
        "64",
        "--data_root",
        str(REPO / "examples" / "data"),
        "--logdir",
        str(tmp_path / "logs"),
        "--max_epochs",
        "1",
    ]
    config = REPO / preset
    assert run(config, "--dry_run", *flags) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["family"] == "sdxl"
    assert report["text_encoder"] is None  # frozen, offloaded, its output cached
    assert report["memory"]["text_encoder"]["counted_in_total"] is False
    assert run(config, *flags) == 0
    assert checkpoints(tmp_path, "last-")
