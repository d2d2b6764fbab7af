"""Single-file checkpoints: written beside checkpoints, loaded by diffusers, read as resume_ckpt."""

from __future__ import annotations

import os
import resource
import signal
import stat
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from config.errors import UserError
from models import ModelBundle, classify_resume_ckpt, load_models
from models.loading import SourceKind
from models.single_file import write_single_file
from training.checkpointing.writer import SaveOptions, save_checkpoint

TINY = ("tiny-sd15", "tiny-sd21")
COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny() -> dict[str, ModelBundle]:
    return {name: load_models(name) for name in TINY}


def keys_and_dtypes(file: Path) -> dict[str, torch.dtype]:
    with safe_open(str(file), framework="pt") as handle:
        return {k: handle.get_slice(k).get_dtype() for k in handle.keys()}  # noqa: SIM118


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].float(), sb[key].float()), key


# --- written beside each checkpoint ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("full_precision", [False, True])
def test_diffusers_loads_the_single_file_with_the_folders_weights(
    tiny: dict[str, ModelBundle], tmp_path: Path, name: str, full_precision: bool
) -> None:
    folder = save_checkpoint(
        tmp_path / "ck",
        tiny[name],
        None,
        SaveOptions(full_precision=full_precision, single_file=True),
    )
    file = tmp_path / "ck.safetensors"
    dtypes = keys_and_dtypes(file)
    assert set(dtypes.values()) == {"F32" if full_precision else "F16"}
    from_file = StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True
    )
    from_folder = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for component in COMPONENTS:
        assert_same_weights(getattr(from_file, component), getattr(from_folder, component))
    assert (tmp_path / "ck.yaml").exists() == (name == "tiny-sd21")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ck", "ck.safetensors"] + (["ck.yaml"] if name == "tiny-sd21" else [])
    )


def test_v_prediction_yaml_says_v(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    write_single_file(tmp_path / "m.safetensors", tiny["tiny-sd21"], False)
    text = (tmp_path / "m.yaml").read_text()
    assert "parameterization: v\n" in text and "FrozenOpenCLIPEmbedder" in text
    # The same name rewritten with an epsilon model: the stale .yaml would mislead UIs.
    write_single_file(tmp_path / "m.safetensors", tiny["tiny-sd15"], False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_writing_leaves_the_models_as_they_were(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    bundle = tiny["tiny-sd21"]
    before = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    write_single_file(tmp_path / "m.safetensors", bundle, False)
    after = bundle.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in after)


def test_single_file_gets_the_usual_file_mode(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_single_file(tmp_path / "m.safetensors", tiny["tiny-sd21"], False)
    finally:
        os.umask(previous)
    for name in ("m.safetensors", "m.yaml"):  # readable by a UI running as another user
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_no_single_file_unless_asked(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", tiny["tiny-sd21"], None)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


# --- atomic writing --------------------------------------------------------------------------


def test_crash_mid_write_keeps_the_older_file(
    tiny: dict[str, ModelBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    write_single_file(path, tiny["tiny-sd21"], True)
    older = path.read_bytes()
    real_save = safetensors.torch.save_file

    def half_then_crash(tensors: dict[str, torch.Tensor], filename: str, **kwargs) -> None:
        real_save(dict(list(tensors.items())[:10]), filename, **kwargs)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_single_file(path, tiny["tiny-sd21"], False)
    assert path.read_bytes() == older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml"]


def test_full_disk_is_a_user_error_and_keeps_the_older_file(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    write_single_file(path, tiny["tiny-sd15"], False)
    older = path.read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))
        with pytest.raises(UserError, match=r"cannot write the single file .*m\.safetensors"):
            write_single_file(path, tiny["tiny-sd15"], True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == older
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_leftovers_of_a_killed_write_are_removed(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    dead = tmp_path / ".m.safetensors.partial-999999999-0a1b"  # no such process
    live = tmp_path / f".m.safetensors.partial-{os.getppid()}-0a1b"  # a running process
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    write_single_file(tmp_path / "m.safetensors", tiny["tiny-sd15"], False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m.safetensors"])


# --- loading as resume_ckpt ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_single_file_loads_as_resume_ckpt(
    tiny: dict[str, ModelBundle], tmp_path: Path, name: str
) -> None:
    path = tmp_path / "model.safetensors"
    write_single_file(path, tiny[name], True)
    assert classify_resume_ckpt(str(path)) is SourceKind.SINGLE_FILE
    loaded = load_models(str(path))
    for component in COMPONENTS:
        assert_same_weights(getattr(loaded, component), getattr(tiny[name], component))
        assert {t.dtype for t in getattr(loaded, component).state_dict().values()} == {
            torch.float32
        }
    assert loaded.prediction_type == tiny[name].prediction_type
    assert len(loaded.tokenizer) == len(tiny[name].tokenizer) == 1152
    assert loaded.source == str(path)


@pytest.mark.slow
def test_fp16_single_file_loads_in_float32(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_single_file(path, tiny["tiny-sd15"], False)
    loaded = load_models(str(path))
    expected = tiny["tiny-sd15"].unet.conv_in.weight.half().float()
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.unet.conv_in.weight, expected)


def ldm_tensors(bundle: ModelBundle, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "source.safetensors"
    write_single_file(path, bundle, True)
    tensors = safetensors.torch.load_file(str(path))
    path.unlink()
    return tensors


@pytest.mark.parametrize("wrapped", [False, True])
def test_ckpt_files_with_and_without_a_state_dict(
    tiny: dict[str, ModelBundle], tmp_path: Path, wrapped: bool
) -> None:
    tensors = ldm_tensors(tiny["tiny-sd15"], tmp_path)
    content = {"epoch": 3, "global_step": 1000, "state_dict": tensors} if wrapped else tensors
    path = tmp_path / "model.CKPT"
    torch.save(content, path)
    loaded = load_models(str(path))
    assert_same_weights(loaded.unet, tiny["tiny-sd15"].unet)
    assert_same_weights(loaded.text_encoder, tiny["tiny-sd15"].text_encoder)


class LightningCallback:
    """Stands for the training-framework objects some .ckpt files pickle."""


def test_ckpt_that_needs_code_is_refused(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    tensors = ldm_tensors(tiny["tiny-sd15"], tmp_path)
    torch.save({"state_dict": tensors, "callbacks": LightningCallback()}, path)
    with pytest.raises(UserError) as error:
        load_models(str(path))
    message = str(error.value)
    assert "LightningCallback" in message and "need code to load" in message
    assert "never runs code from a checkpoint. Convert it to .safetensors" in message


def test_unknown_layout_names_what_was_found(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    tensors = ldm_tensors(tiny["tiny-sd15"], tmp_path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}
    tensors["conditioner.embedders.0.weight"] = torch.zeros(2)
    weight = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[weight] = torch.zeros(32, 9, 3, 3)  # an inpainting UNet's 9 input channels
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(UserError) as error:
        load_models(str(path))
    message = str(error.value)
    assert "is not a Stable Diffusion 1.x/2.x/XL single file this trainer knows" in message
    assert "UNet (208 tensors, 9 input channels, 32 channels)" in message
    assert "CLIP text encoder (12 layers, width 32, 1152 tokens)" in message
    assert "1 unexpected (conditioner.embedders.0.weight)" in message
    assert "Closest known layout: tiny-sd15 (184 missing (first_stage_model." in message
    assert f"1 of another shape ({weight} is [32, 9, 3, 3], expected [32, 4, 3, 3])" in message


def test_extra_keys_of_real_files_are_accepted(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    """EMA copies, DDPM buffers, position ids, OpenCLIP's 24th layer and logit scale."""
    extras = {
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.zeros(1000),
        **{f"model_ema.diffusion_modelinput_blocks{i}": torch.zeros(1) for i in range(101)},
        "first_stage_model.loss.logvar": torch.zeros(1),
    }
    for name, text_extras in (
        ("tiny-sd15", {CLIP_POSITION_IDS: torch.arange(77)[None]}),
        ("tiny-sd21", {f"{LAYER_23}.ln_1.weight": torch.ones(32), LOGIT_SCALE: torch.ones(())}),
    ):
        path = tmp_path / f"{name}.safetensors"
        tensors = ldm_tensors(tiny[name], tmp_path) | extras | text_extras
        safetensors.torch.save_file(tensors, str(path))
        loaded = load_models(str(path))
        for component in COMPONENTS:
            assert_same_weights(getattr(loaded, component), getattr(tiny[name], component))


CLIP_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
LAYER_23 = "cond_stage_model.model.transformer.resblocks.23"
LOGIT_SCALE = "cond_stage_model.model.logit_scale"


def test_files_that_are_not_single_files(tmp_path: Path) -> None:
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(UserError, match=r"is a file but not a single-file checkpoint"):
        classify_resume_ckpt(str(other))
    empty = tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        load_models(str(empty))
    broken = tmp_path / "model.ckpt"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"cannot be read as a \.ckpt"):
        load_models(str(broken))


def test_ckpt_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save(OrderedDict(), path)
    with pytest.raises(UserError, match="Found: no Stable Diffusion weights"):
        load_models(str(path))


# --- prediction type -------------------------------------------------------------------------


@pytest.mark.slow
def test_prediction_type_from_yaml_rule_and_override(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    sd21 = tmp_path / "sd21.safetensors"
    write_single_file(sd21, tiny["tiny-sd21"], True)
    assert (tmp_path / "sd21.yaml").exists()
    assert load_models(str(sd21)).prediction_type == "v_prediction"
    (tmp_path / "sd21.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load_models(str(sd21)).prediction_type == "epsilon"  # the .yaml decides
    (tmp_path / "sd21.yaml").unlink()
    assert load_models(str(sd21)).prediction_type == "v_prediction"  # rule: SD2.x layout → v
    sd15 = tmp_path / "sd15.safetensors"
    write_single_file(sd15, tiny["tiny-sd15"], True)
    assert load_models(str(sd15)).prediction_type == "epsilon"  # rule: SD1.x layout → epsilon
    (tmp_path / "sd15.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert load_models(str(sd15)).prediction_type == "v_prediction"
    # train.json's prediction_type overrides every source, built-in names included.
    assert load_models(str(sd15), "epsilon").prediction_type == "epsilon"
    assert load_models("tiny-sd15", "v_prediction").prediction_type == "v_prediction"
    assert load_models("tiny-sd21", "epsilon").noise_scheduler.config.prediction_type == "epsilon"


def test_text_encoder_layers_read_from_the_header(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    from training.before_models import expected_text_encoder_layers

    for name, layers in (("tiny-sd15", 12), ("tiny-sd21", 23)):
        path = tmp_path / f"{name}.safetensors"
        write_single_file(path, tiny[name], False)
        assert expected_text_encoder_layers(str(path)) == layers
