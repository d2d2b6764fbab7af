"""train.py with single files: written beside checkpoints, read as resume_ckpt, findlast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from config.errors import UserError
from models import load_models
from models.builtin import build_builtin
from models.bundle import ModelBundle
from models.pipeline_folder import pipeline_of
from models.single_file import write_single_file
from tests.e2e import (
    ADAMW,
    assert_same_weights,
    checkpoints,
    run,
    run_folders,
    scalars,
    write_config,
)
from training.checkpointing.find_last import find_last_checkpoint


def single_files(folder: Path) -> list[str]:
    return sorted(p.name for run in run_folders(folder) for p in run.glob("*.safetensors"))


@pytest.mark.slow
def test_every_checkpoint_has_a_single_file_and_no_save_ckpt_skips_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "on", ADAMW, resume_ckpt="tiny-sd21", max_epochs=2, save_every_n_epochs=1
    )
    assert run(config) == 0
    names = [p.name for p in checkpoints(tmp_path / "on")]
    assert names == ["last-myproj-ep02-gs00014", "myproj-ep01-gs00007"]
    assert single_files(tmp_path / "on") == [f"{name}.safetensors" for name in names]
    (run_folder,) = run_folders(tmp_path / "on")
    assert sorted(p.name for p in run_folder.glob("*.yaml")) == [f"{n}.yaml" for n in names]
    with safe_open(str(run_folder / f"{names[0]}.safetensors"), framework="pt") as file:
        key = "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"
        assert file.get_slice(key).get_dtype() == "F16"
    # The final single file holds the trained weights (fp16), like the folder's pipeline files.
    trained = load_models(str(run_folder / f"{names[0]}.safetensors"))
    from_folder = load_models(str(run_folder / names[0]))
    assert torch.equal(trained.unet.conv_in.weight, from_folder.unet.conv_in.weight)

    config = write_config(tmp_path / "off", ADAMW, max_epochs=1, no_save_ckpt=True)
    assert run(config) == 0
    assert checkpoints(tmp_path / "off") and single_files(tmp_path / "off") == []


@pytest.mark.slow
def test_text_encoder_files_have_the_standard_keys(tmp_path: Path) -> None:
    config = write_config(tmp_path, ADAMW, max_epochs=1)
    assert run(config) == 0
    (last,) = checkpoints(tmp_path, "last-")
    with safe_open(str(last / "text_encoder" / "model.safetensors"), framework="pt") as file:
        keys = list(file.keys())
    assert keys and all(key.startswith("text_model.") for key in keys)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
def test_a_single_file_trains_as_resume_ckpt(tmp_path: Path, model: str) -> None:
    source = tmp_path / "downloaded" / "model.safetensors"
    source.parent.mkdir()
    write_single_file(source, load_models(model), False)
    config = write_config(tmp_path / "run", ADAMW, resume_ckpt=str(source), max_epochs=1)
    assert run(config) == 0
    (folder,) = run_folders(tmp_path / "run")
    assert len(scalars(folder, "loss/train")) == 7
    resolved = json.loads((folder / "config.json").read_text())
    expected = "v_prediction" if model == "tiny-sd21" else "epsilon"
    assert resolved["model"]["prediction_type"] == expected
    (last,) = checkpoints(tmp_path / "run", "last-")
    assert (last.parent / f"{last.name}.safetensors").is_file()


def test_prediction_type_key_overrides_the_model(capsys, tmp_path: Path) -> None:
    config = write_config(tmp_path, ADAMW, prediction_type="v_prediction")
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["prediction_type"] == "v_prediction"
    assert report["sources"]["train.prediction_type"] == "train.json"
    config = write_config(tmp_path, ADAMW, prediction_type="x0")
    assert run(config, "--dry_run") == 2


def test_pickled_code_ckpt_exits_2(tmp_path: Path, caplog) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "callbacks": Path("x")}, path)
    config = write_config(tmp_path, ADAMW, resume_ckpt=str(path))
    assert run(config, "--dry_run") == 2
    assert "pathlib" in caplog.text and "Convert it to .safetensors" in caplog.text


# --- findlast --------------------------------------------------------------------------------


@pytest.mark.slow
def test_findlast_resumes_the_newest_checkpoint_of_the_project(capsys, tmp_path: Path) -> None:
    config = write_config(tmp_path, ADAMW, max_epochs=1)
    assert run(config) == 0
    (last,) = checkpoints(tmp_path, "last-")
    config = write_config(tmp_path, ADAMW, resume_ckpt="findlast", max_epochs=2)
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["resume_ckpt"] == report["train"]["resume_ckpt"] == str(last)
    assert run(config) == 0  # continues the run: one more epoch
    names = [p.name for p in checkpoints(tmp_path, "last-")]
    assert names == ["last-myproj-ep01-gs00007", "last-myproj-ep02-gs00014"]


def test_findlast_without_checkpoints_exits_2(tmp_path: Path, caplog) -> None:
    config = write_config(tmp_path, ADAMW, resume_ckpt="findlast", project_name="other")
    assert run(config, "--dry_run") == 2
    assert "findlast found no checkpoint of project 'other'" in caplog.text


def make_checkpoint(folder: Path, name: str, mtime: float) -> Path:
    checkpoint = folder / name
    checkpoint.mkdir(parents=True)
    marker = checkpoint / "model_index.json"
    marker.write_text("{}")
    os.utime(marker, (mtime, mtime))
    return checkpoint


def test_findlast_picks_by_time_then_step(tmp_path: Path) -> None:
    logs, elsewhere = tmp_path / "logs", tmp_path / "ckpts"
    make_checkpoint(logs / "proj_20240101-000000", "last-proj-ep05-gs00500", 1000)
    newest = make_checkpoint(logs / "proj_20240102-000000", "interrupted-proj-ep02-gs00200", 2000)
    make_checkpoint(logs / "proj_20240102-000000", "proj-ep01-gs00100", 1500)
    make_checkpoint(logs / "other_20240103-000000", "last-other-ep09-gs00900", 9000)
    make_checkpoint(logs / "proj_20240104-000000", ".proj-ep03-gs00300.partial-1-ab", 9000)
    (logs / "proj_20240104-000000" / "proj-ep03-gs00300").mkdir()  # no model_index.json
    assert find_last_checkpoint("proj", logs, None) == newest
    in_ckpts = make_checkpoint(elsewhere, "proj-ep03-gs00300", 3000)
    assert find_last_checkpoint("proj", logs, elsewhere) == in_ckpts
    same_time = make_checkpoint(elsewhere, "proj-ep03-gs00301", 3000)
    assert find_last_checkpoint("proj", logs, elsewhere) == same_time
    make_checkpoint(elsewhere, "diverged-proj-ep04-gs00400", 4000)
    with pytest.raises(UserError, match="saved when training diverged"):
        find_last_checkpoint("proj", logs, elsewhere)
    with pytest.raises(UserError, match=r"no checkpoint of project 'proj\.x'"):
        find_last_checkpoint("proj.x", logs, elsewhere)


# --- the real SD1.5 layout, full size --------------------------------------------------------


def full_size(name: str) -> ModelBundle:
    """Built-in model ``name`` at full size in fp16, each weight a run of a pool of random values
    from a random start: build_builtin's modules, names and shapes in seconds, without drawing a
    billion values for the kaiming initialization or holding fp32 copies (this machine pays
    seconds for each GB of memory it first touches)."""
    with torch.device("meta"):
        bundle = build_builtin(name)
    bundle.noise_scheduler = type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config)
    generator = torch.Generator().manual_seed(0)
    pool = (torch.rand(2**22, generator=generator) * 0.2 - 0.1).half()
    for model in (bundle.unet, bundle.vae, bundle.text_encoder):
        model.to(torch.float16).to_empty(device="cpu")
        for tensor in model.state_dict().values():  # shares the parameters' and buffers' storage
            flat, done = tensor.view(-1), 0
            start = int(torch.randint(len(pool), (1,), generator=generator))
            while done < len(flat):
                piece = pool[start : start + len(flat) - done]
                flat[done : done + len(piece)] = piece
                done, start = done + len(piece), 0
    return bundle


def config_folder(bundle: ModelBundle, folder: Path) -> Path:
    """The diffusers folder of ``bundle`` without its weights: what ``from_single_file`` reads
    as ``config``."""
    pipeline = pipeline_of(bundle, bundle.noise_scheduler)
    pipeline.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipeline, name).save_config(folder / name)
    bundle.text_encoder.config.save_pretrained(folder / "text_encoder")
    bundle.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@pytest.mark.slow
def test_sd15_random_single_file_loads_in_diffusers_and_alone_as_resume_ckpt(
    capsys, tmp_path: Path
) -> None:
    bundle = full_size("sd15-random")
    file = write_single_file(tmp_path / "ck.safetensors", bundle, full_precision=False)
    from_file = StableDiffusionPipeline.from_single_file(
        str(file),
        config=str(config_folder(bundle, tmp_path / "ck")),
        local_files_only=True,
        torch_dtype=torch.float16,
    )
    for component in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(bundle, component), getattr(from_file, component))
    del from_file, bundle
    lone = tmp_path / "downloads" / "v1-5-like.safetensors"  # no folder, no .yaml beside it
    lone.parent.mkdir()
    file.rename(lone)
    config = write_config(tmp_path / "run", resume_ckpt=str(lone), resolution=64)
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["prediction_type"] == "epsilon"
    assert report["model"]["text_encoder_layers"] == 12
    assert report["unet"]["trainable_parameters"] == 859_520_964
