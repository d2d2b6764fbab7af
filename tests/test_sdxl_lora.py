"""SDXL LoRA files: kohya's SDXL names (``lora_unet_`` with LDM module names, ``lora_te1_``,
``lora_te2_``) and diffusers' file, each loaded by diffusers' ``StableDiffusionXLPipeline
.load_lora_weights`` with the trainer's own outputs; read back for ``lora_init``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from config.errors import UserError
from lora.files import write_diffusers_file, write_kohya_file
from lora.kohya import KohyaNaming
from lora.reading import apply_lora_init, read_lora_file
from models import ModelBundle, added_cond_kwargs
from models.builtin import BUILTIN_CONFIGS, build_builtin
from tests.lora_helpers import LOCON, RANK4, adapted, base_pipeline, info_of, models_of


def write_both(bundle: ModelBundle, settings, folder: Path) -> Path:
    naming = KohyaNaming.of(bundle.unet)
    kohya = write_kohya_file(
        folder / "run.safetensors", models_of(bundle), settings, info_of(bundle), False, naming
    )
    write_diffusers_file(folder, models_of(bundle), False)
    return kohya


def outputs(unet, text_encoder, text_encoder_2) -> list[torch.Tensor]:
    """Both encoders' hidden states and the UNet's output (SDXL's added conditions) on fixed
    inputs, each model on its own."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 8), generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    condition = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, text_encoder_2.config.projection_dim, generator=generator)
    time_ids = torch.tensor([[96.0, 64.0, 8.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        sample = unet(
            latents,
            torch.tensor([700]),
            condition,
            added_cond_kwargs=added_cond_kwargs(pooled, time_ids),
        ).sample
        return [
            text_encoder(ids).last_hidden_state,
            text_encoder_2(ids, output_hidden_states=True).hidden_states[-2],
            sample,
        ]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [RANK4, LOCON], ids=["lora", "locon"])
def test_diffusers_loads_both_sdxl_files_with_the_trainers_outputs(settings, tmp_path):
    bundle = adapted("tiny-sdxl", settings)
    kohya = write_both(bundle, settings, tmp_path)
    base = build_builtin("tiny-sdxl")
    before = outputs(base.unet, base.text_encoder, base.text_encoder_2)
    mine = outputs(bundle.unet, bundle.text_encoder, bundle.text_encoder_2)
    for ours, theirs in zip(mine, before, strict=True):  # the adapters change every model
        assert (ours - theirs).abs().max() > 1e-2
    for source in (kohya, tmp_path):  # kohya's file; the folder with diffusers' file
        pipe = base_pipeline("tiny-sdxl")
        pipe.load_lora_weights(str(source))
        loaded = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for ours, theirs in zip(mine, loaded, strict=True):
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_kohya_names_of_the_real_sdxl_unet():
    """SDXL 1.0's UNet (two resnets per level): the names kohya's SDXL LoRAs have."""
    naming = KohyaNaming(sdxl=True, unet_config=BUILTIN_CONFIGS["sdxl-random"]["unet"])
    b = "transformer_blocks"
    cases = {
        f"down_blocks.1.attentions.0.{b}.0.attn1.to_q": f"input_blocks_4_1_{b}_0_attn1_to_q",
        f"down_blocks.2.attentions.1.{b}.9.ff.net.2": f"input_blocks_8_1_{b}_9_ff_net_2",
        "mid_block.attentions.0.proj_out": "middle_block_1_proj_out",
        f"up_blocks.0.attentions.2.{b}.0.attn2.to_v": f"output_blocks_2_1_{b}_0_attn2_to_v",
        "up_blocks.1.resnets.0.conv1": "output_blocks_3_0_in_layers_2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    }
    for module, name in cases.items():
        assert naming.name("unet", module) == f"lora_unet_{name}"
    text = "text_model.encoder.layers.0.self_attn.q_proj"
    assert (
        naming.name("text_encoder", text) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert (
        naming.name("text_encoder_2", text)
        == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    )


def test_kohya_sdxl_names_and_metadata(tmp_path):
    bundle = adapted("tiny-sdxl", LOCON)
    kohya = write_both(bundle, LOCON, tmp_path)
    with safe_open(str(kohya), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    # the UNet's modules by their LDM names, as kohya's SDXL UNet and A1111 name them
    attention = "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight"
    assert attention in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys  # LoCon: conv1
    assert "lora_unet_middle_block_1_proj_in.lora_down.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert not any("down_blocks" in key or "mid_block" in key for key in keys)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight" in keys
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_v2"] == "False"


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_sdxl_files_read_back_into_sdxl_adapters(kind, tmp_path):
    bundle = adapted("tiny-sdxl", RANK4)
    kohya = write_both(bundle, RANK4, tmp_path)
    fresh = adapted("tiny-sdxl", RANK4, seed=7)
    lora_file = read_lora_file(kohya if kind == "kohya" else tmp_path, models_of(fresh))
    assert set(lora_file.weights) == {"unet", "text_encoder", "text_encoder_2"}
    apply_lora_init(lora_file, models_of(fresh))
    expected = outputs(bundle.unet, bundle.text_encoder, bundle.text_encoder_2)
    got = outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_an_sd_lora_does_not_fit_an_sdxl_model(tmp_path):
    sd = adapted("tiny-sd15", RANK4)
    file = write_kohya_file(tmp_path / "sd.safetensors", models_of(sd), RANK4, info_of(sd), False)
    with pytest.raises(UserError, match="SDXL model"):
        read_lora_file(file, models_of(build_builtin("tiny-sdxl")))


def test_a_text_encoders_only_sdxl_lora_continues_into_adapters_without_the_unet(tmp_path):
    """UNet frozen: only the two encoders have adapters, and `lora_init` maps the file onto
    them without a UNet among the adapted models."""
    bundle = adapted("tiny-sdxl", RANK4, train_unet=False)
    file = write_both(bundle, RANK4, tmp_path)
    with safe_open(str(file), framework="pt") as handle:
        assert {key.split("_")[1] for key in handle.keys()} == {"te1", "te2"}  # noqa: SIM118
    fresh = adapted("tiny-sdxl", RANK4, train_unet=False, seed=7)
    lora_file = read_lora_file(file, models_of(fresh))
    text_only = {k: v for k, v in models_of(fresh).items() if k != "unet"}
    assert apply_lora_init(lora_file, text_only) > 0
    expected = outputs(bundle.unet, bundle.text_encoder, bundle.text_encoder_2)
    got = outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
