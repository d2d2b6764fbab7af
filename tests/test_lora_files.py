"""LoRA exports (issue: LoRA/LoCon): diffusers loads them and gets the trainer's own outputs.

A base pipeline plus ``pipe.load_lora_weights`` of the kohya file, or of the folder holding the
diffusers file, must compute what the trainer's adapted models compute. The adapters' weights
are random and rounded to fp16 values first, so the fp16 files hold them exactly and the
outputs agree to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora.files import DIFFUSERS_WEIGHTS, write_diffusers_file, write_kohya_file
from lora.kohya import KohyaNaming
from tests.lora_helpers import (
    LOCON,
    RANK4,
    adapted,
    base_outputs,
    base_pipeline,
    info_of,
    models_of,
    outputs,
)

CASES = [("tiny-sd15", RANK4), ("tiny-sd21", RANK4), ("tiny-sd15", LOCON), ("tiny-sd21", LOCON)]


def write_both(bundle, settings, folder: Path, full_precision: bool = False) -> Path:
    kohya = write_kohya_file(
        folder / "run.safetensors", models_of(bundle), settings, info_of(bundle), full_precision
    )
    write_diffusers_file(folder, models_of(bundle), full_precision)
    return kohya


def assert_same_outputs(pipe, bundle) -> None:
    base_hidden, base_sample = base_outputs(bundle.source)
    hidden, sample = outputs(bundle.unet, bundle.text_encoder)
    # The adapters change both models' outputs, so agreeing below means they were loaded.
    assert (hidden - base_hidden).abs().max() > 1e-2
    assert (sample - base_sample).abs().max() > 1e-2
    loaded_hidden, loaded_sample = outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(loaded_hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_sample, sample, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "settings"), CASES)
def test_diffusers_loads_both_files_with_the_trainers_outputs(name, settings, tmp_path):
    bundle = adapted(name, settings)
    kohya = write_both(bundle, settings, tmp_path)
    for source in (kohya, tmp_path):  # the kohya file; the folder with the diffusers file
        pipe = base_pipeline(name)
        pipe.load_lora_weights(str(source))
        assert_same_outputs(pipe, bundle)


@pytest.mark.slow
def test_full_precision_files_are_fp32_and_load_the_same(tmp_path):
    bundle = adapted("tiny-sd15", LOCON)
    with torch.no_grad():  # values fp16 cannot hold: the fp32 files must keep them
        bundle.unet.down_blocks[0].resnets[0].conv1.lora_B["default"].weight.add_(1e-4 / 3)
    kohya = write_both(bundle, LOCON, tmp_path, full_precision=True)
    for file in (kohya, tmp_path / DIFFUSERS_WEIGHTS):
        with safe_open(str(file), framework="pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}  # noqa: SIM118
    for source in (kohya, tmp_path):
        pipe = base_pipeline("tiny-sd15")
        pipe.load_lora_weights(str(source))
        assert_same_outputs(pipe, bundle)


def test_kohya_file_keys_shapes_and_dtypes(tmp_path):
    bundle = adapted("tiny-sd15", LOCON)
    kohya = write_both(bundle, LOCON, tmp_path)
    with safe_open(str(kohya), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    attention = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{attention}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{attention}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{attention}.alpha"].shape == () and tensors[f"{attention}.alpha"] == 2.0
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert tensors[f"{conv}.alpha"] == 1.0
    shortcut = "lora_unet_up_blocks_0_resnets_0_conv_shortcut"  # 1x1: the network rank
    assert tensors[f"{shortcut}.lora_down.weight"].shape == (4, 128, 1, 1)
    text = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{text}.lora_down.weight"].shape == (4, 32)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in tensors)
    assert len(tensors) == 3 * (79 + 72)
    assert KohyaNaming().name("unet", "mid_block.attentions.0.proj_in") == (
        "lora_unet_mid_block_attentions_0_proj_in"
    )


def kohya_metadata_of(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata()


def test_kohya_metadata_sd15_locon(tmp_path):
    bundle = adapted("tiny-sd15", LOCON)
    meta = kohya_metadata_of(write_both(bundle, LOCON, tmp_path))
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "run" and meta["ss_training_started_at"] == "1700000000.5"
    assert meta["ss_steps"] == "12" and meta["ss_epoch"] == "3"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8


def test_kohya_metadata_sd21_v_prediction_without_locon(tmp_path):
    bundle = adapted("tiny-sd21", RANK4)
    meta = kohya_metadata_of(write_both(bundle, RANK4, tmp_path))
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert "ss_network_args" not in meta


def test_model_hash_is_the_sha256_after_the_header(tmp_path):
    """sd-webui-additional-networks' hash: SHA-256 of the bytes after the header, which do not
    depend on the metadata, so the final file gives the same hash."""
    import hashlib

    bundle = adapted("tiny-sd15")
    kohya = write_both(bundle, RANK4, tmp_path)
    data = kohya.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert (
        hashlib.sha256(data[8 + header :]).hexdigest()
        == (kohya_metadata_of(kohya)["sshs_model_hash"])
    )


def test_only_trained_models_are_in_the_files(tmp_path):
    bundle = adapted("tiny-sd15", train_text_encoder=False)
    kohya = write_both(bundle, RANK4, tmp_path)
    with safe_open(str(kohya), framework="pt") as handle:
        assert all(k.startswith("lora_unet_") for k in handle.keys())  # noqa: SIM118
    with safe_open(str(tmp_path / DIFFUSERS_WEIGHTS), framework="pt") as handle:
        assert all(k.startswith("unet.") for k in handle.keys())  # noqa: SIM118
    pipe = base_pipeline("tiny-sd15")
    pipe.load_lora_weights(str(kohya))
    assert_same_outputs_unet_only(pipe, bundle)


def assert_same_outputs_unet_only(pipe, bundle) -> None:
    hidden, sample = outputs(bundle.unet, bundle.text_encoder)
    loaded_hidden, loaded_sample = outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(loaded_hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(loaded_sample, sample, rtol=1e-5, atol=1e-5)


def test_files_of_a_partly_frozen_text_encoder_load_the_same(tmp_path):
    """Only the trained layers have adapters; diffusers' metadata must not adapt the others."""
    bundle = adapted("tiny-sd15", frozen=range(7))
    kohya = write_both(bundle, RANK4, tmp_path)
    for source in (kohya, tmp_path):
        pipe = base_pipeline("tiny-sd15")
        pipe.load_lora_weights(str(source))
        layers = {n.split(".")[2] for n, _ in pipe.text_encoder.named_modules() if "lora_A" in n}
        assert layers == {"7", "8", "9", "10", "11"}
        assert_same_outputs(pipe, bundle)
