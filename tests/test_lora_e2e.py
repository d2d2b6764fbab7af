"""LoRA runs end to end: train.py trains adapters, writes files diffusers loads, resumes exactly.

One straight run per model (2 epochs, a resumable checkpoint after 1, EMA on) and one run
resumed from that checkpoint are shared by the tests that only read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora.adapters import adapter_parameters
from lora.files import DIFFUSERS_WEIGHTS, read_metadata
from lora.inject import add_lora_adapters
from lora.settings import LoraSettings
from models.builtin import build_builtin
from tests.e2e import (
    ADAMW,
    checkpoints,
    quick_prompts,
    run,
    run_folders,
    scalars,
    write_config,
)
from tests.group import run_forked
from tests.lora_helpers import base_pipeline, outputs

pytestmark = pytest.mark.slow

LORA = {"lora_rank": 4, "lora_alpha": 2.0}
LOCON = {**LORA, "lora_conv_rank": 2, "lora_conv_alpha": 1.0}
MODELS = {"tiny-sd15": LOCON, "tiny-sd21": LORA}
RUN = {
    "max_epochs": 2,
    "save_every_n_epochs": 1,
    "save_optimizer": True,
    "grad_accum": 2,
    "ema_decay_rate": 0.9,
    "ema_update_interval": 1,
}
COSINE = {"base": {"optimizer": "adamw", "lr": 1e-3, "lr_scheduler": "cosine"}}


def lora_checkpoints(folder: Path, prefix: str) -> list[Path]:
    """The run's own LoRA checkpoints (not the ``_ema`` and ``-merged`` ones beside them)."""
    return [p for p in checkpoints(folder, prefix) if not p.name.endswith(("_ema", "-merged"))]


def settings_of(keys: dict) -> LoraSettings:
    return LoraSettings.of(
        keys["lora_rank"],
        keys["lora_alpha"],
        0.0,
        keys.get("lora_conv_rank", 0),
        keys.get("lora_conv_alpha"),
    )


@pytest.fixture(scope="module", params=sorted(MODELS))
def runs(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(model, the straight run's folder, the resumed run's folder)."""
    model, keys = request.param, MODELS[request.param]
    folder = tmp_path_factory.mktemp(model)
    straight = write_config(folder / "straight", COSINE, resume_ckpt=model, **RUN, **keys)
    assert run(straight) == 0
    (middle,) = lora_checkpoints(folder / "straight", "myproj-")
    resumed = write_config(folder / "resumed", COSINE, **RUN, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    return model, folder / "straight", folder / "resumed"


def adapters_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 adapters a resumable LoRA checkpoint holds, by model."""
    found = {}
    for file in sorted((checkpoint / "training_state").glob("*_lora.safetensors")):
        model = file.name.removesuffix("_lora.safetensors")
        found |= {f"{model}.{k}": v for k, v in safetensors.torch.load_file(str(file)).items()}
    return found


def test_a_lora_checkpoint_holds_the_adapters_and_a_kohya_file_beside_it(runs):
    _model, straight, _ = runs
    (last,) = lora_checkpoints(straight, "last-")
    assert (last / DIFFUSERS_WEIGHTS).is_file()
    assert not (last / "model_index.json").exists()  # the base model is not copied
    assert {p.name for p in (last / "training_state").iterdir()} >= {
        "unet_lora.safetensors",
        "text_encoder_lora.safetensors",
        "lora.json",
        "state.json",
    }
    kohya = last.with_name(f"{last.name}.safetensors")
    metadata = read_metadata(kohya)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4"
    keys = safetensors.torch.load_file(str(kohya)).keys()
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    ema = last.with_name(f"{last.name}_ema")
    assert (ema / DIFFUSERS_WEIGHTS).is_file()
    assert ema.with_name(f"{ema.name}.safetensors").is_file()


def test_the_adapters_trained_and_the_base_did_not(runs):
    _model, straight, _ = runs
    (last,) = lora_checkpoints(straight, "last-")
    adapters = adapters_of(last)
    ups = [v for k, v in adapters.items() if ".lora_B." in k]
    assert ups and all(torch.isfinite(v).all() for v in ups)
    assert any(v.abs().max() > 0 for v in ups)  # lora_B starts at zero: training moved it


def test_lora_resume_is_exact(runs):
    _model, straight, resumed = runs
    (full,) = lora_checkpoints(straight, "last-")
    (continued,) = lora_checkpoints(resumed, "last-")
    assert full.name == continued.name
    a, b = adapters_of(full), adapters_of(continued)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed LoRA run differs"
    ema_a = safetensors.torch.load_file(str(full.with_name(f"{full.name}_ema.safetensors")))
    ema_b = safetensors.torch.load_file(
        str(continued.with_name(f"{continued.name}_ema.safetensors"))
    )
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.parametrize("form", ["kohya", "diffusers"])
def test_diffusers_loads_the_runs_files_with_the_trainers_outputs(runs, form):
    """A base pipeline plus the file gives what the trainer's adapted models give, with the
    adapters rounded to fp16 as the files hold them."""
    model, straight, _ = runs
    (last,) = lora_checkpoints(straight, "last-")
    trainer = build_builtin(model)
    add_lora_adapters(trainer, settings_of(MODELS[model]), True, True)
    saved = adapters_of(last)
    with torch.no_grad():
        for name, part in (("unet", trainer.unet), ("text_encoder", trainer.text_encoder)):
            for key, p in adapter_parameters(part).items():
                p.copy_(saved[f"{name}.{key}"].half().float())
    pipe = base_pipeline(model)
    source = last.with_name(f"{last.name}.safetensors") if form == "kohya" else last
    pipe.load_lora_weights(str(source))
    hidden, sample = outputs(trainer.unet, trainer.text_encoder)
    loaded_hidden, loaded_sample = outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(loaded_hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_sample, sample, rtol=1e-5, atol=1e-5)


def test_lora_merge_writes_the_merged_model_as_a_full_checkpoint(tmp_path):
    config = write_config(tmp_path, ADAMW, max_epochs=1, lora_merge=True, **LORA)
    assert run(config) == 0
    (last,) = lora_checkpoints(tmp_path, "last-")
    merged = last.with_name(f"{last.name}-merged")
    assert (merged / "model_index.json").is_file()
    assert merged.with_name(f"{merged.name}.safetensors").is_file()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(merged))
    base = base_pipeline("tiny-sd15")
    base.load_lora_weights(str(last))
    got = outputs(pipe.unet, pipe.text_encoder)
    want = outputs(base.unet, base.text_encoder)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3)  # fp16 merged weights


def test_resuming_a_lora_checkpoint_without_lora_rank_is_an_error(runs, tmp_path):
    _model, straight, _ = runs
    (last,) = lora_checkpoints(straight, "last-")
    config = write_config(tmp_path, ADAMW, resume_ckpt=str(last))
    result = run_forked(config)
    assert result.returncode == 2
    assert "set lora_rank" in result.stderr
    assert "Traceback" not in result.stderr


def test_findlast_finds_a_lora_checkpoint(runs, tmp_path):
    model, straight, _ = runs
    keys = {**RUN, **MODELS[model], "max_epochs": 3, "logdir": str(straight / "logs")}
    config = write_config(tmp_path, COSINE, resume_ckpt="findlast", **keys)
    assert run(config, "--dry_run") == 0


def test_the_dry_run_reports_the_adapters(tmp_path, capsys):
    config = write_config(tmp_path, ADAMW, **LOCON)
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    lora = report["lora"]
    assert lora["rank"] == 4 and lora["conv_rank"] == 2
    assert lora["unet"]["parameters"] == report["unet"]["trainable_parameters"]
    assert lora["text_encoder"]["parameters"] == report["text_encoder"]["trainable_parameters"]
    assert report["memory"]["unet"]["gradients_bytes"] == 4 * lora["unet"]["parameters"]


def test_a_lora_run_samples_and_validates(tmp_path):
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"validate_training": True, "auto_split_proportion": 0.2}))
    config = write_config(
        tmp_path,
        ADAMW,
        max_epochs=1,
        sample_prompts=quick_prompts(tmp_path),
        sample_steps=5,
        validation_config=str(validation),
        **LORA,
    )
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    assert len(list((folder / "samples").glob("*.png"))) == 1  # one prompt at one scale
    assert len(scalars(folder, "loss/val")) >= 2  # before training and after the epoch
