"""Diffusers → LDM key mapping, the generated LDM config, and standard text-encoder keys."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextModel

from models import ModelBundle, load_models
from models.ldm_config import original_config, read_prediction_type
from models.ldm_layout import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ldm_state_dict,
)
from models.single_file_load import expected_shapes
from models.text_keys import standard_text_encoder_state_dict

TINY = ("tiny-sd15", "tiny-sd21")


@pytest.fixture(scope="module")
def tiny() -> dict[str, ModelBundle]:
    return {name: load_models(name) for name in TINY}


def assert_equal_weights(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    own = model.state_dict()
    assert set(converted) == set(own)
    for key, tensor in own.items():
        assert converted[key].shape == tensor.shape, key
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("name", TINY)
def test_diffusers_converters_undo_the_mapping(tiny: dict[str, ModelBundle], name: str) -> None:
    bundle = tiny[name]
    ldm = ldm_state_dict(bundle.unet, bundle.vae, bundle.text_encoder)
    unet = convert_ldm_unet_checkpoint(ldm, dict(bundle.unet.config))
    assert_equal_weights(unet, bundle.unet)
    vae = convert_ldm_vae_checkpoint(ldm, dict(bundle.vae.config))
    assert_equal_weights(vae, bundle.vae)
    if name == "tiny-sd21":
        text = convert_open_clip_checkpoint(bundle.text_encoder, ldm)
    else:
        text = convert_ldm_clip_checkpoint(ldm)
    # transformers 5's CLIPTextModel has no text_model wrapper; diffusers strips it the same way.
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    assert_equal_weights(text, bundle.text_encoder)


def test_every_weight_is_written_once_under_the_three_prefixes(
    tiny: dict[str, ModelBundle],
) -> None:
    for name, bundle in tiny.items():
        ldm = ldm_state_dict(bundle.unet, bundle.vae, bundle.text_encoder)
        text_prefix = OPEN_CLIP_PREFIX if name == "tiny-sd21" else CLIP_PREFIX
        count = {p: sum(k.startswith(p) for k in ldm) for p in (UNET_PREFIX, VAE_PREFIX)}
        assert count[UNET_PREFIX] == len(bundle.unet.state_dict())
        assert count[VAE_PREFIX] == len(bundle.vae.state_dict())
        assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, text_prefix)) for k in ldm)


def test_the_identity_conversion_copies_nothing(tiny: dict[str, ModelBundle]) -> None:
    bundle = tiny["tiny-sd15"]
    ldm = ldm_state_dict(bundle.unet, bundle.vae, bundle.text_encoder)
    pointers = {t.data_ptr() for t in bundle.unet.state_dict().values()}
    unet = [t for k, t in ldm.items() if k.startswith(UNET_PREFIX)]
    assert all(t.data_ptr() in pointers for t in unet)


# Keys and shapes of the real SD1.5 and SD2.1 single files (v1-5-pruned-emaonly.safetensors,
# v2-1_768-ema-pruned.safetensors), as AUTOMATIC1111 and ComfyUI read them.
REAL_KEYS = {
    "sd15-random": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            320,
            768,
        ),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.norm_out.weight": (128,),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    },
    "sd21-random": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            320,
            1024,
        ),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.ln_final.bias": (1024,),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
        "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight": (1024, 1024),
        "cond_stage_model.model.transformer.resblocks.22.ln_2.weight": (1024,),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias": (1024,),
    },
}


@pytest.mark.parametrize("name", sorted(REAL_KEYS))
def test_full_size_layout_has_the_real_keys_and_shapes(name: str) -> None:
    shapes = expected_shapes(name)  # built on the meta device: no memory
    for key, shape in REAL_KEYS[name].items():
        assert shapes.get(key) == shape, key
    counts = {  # SD2.x: 23 of OpenCLIP's 24 text layers, as diffusers keeps them
        "sd15-random": (686, 248, 196),
        "sd21-random": (686, 248, 23 * 12 + 5),
    }[name]
    assert tuple(
        sum(k.startswith(p) for k in shapes) for p in (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")
    ) == (counts)
    if name == "sd21-random":
        assert not any("cond_stage_model.transformer." in k for k in shapes)
        assert not any(k.endswith(("q_proj.weight", "k_proj.weight")) for k in shapes)


@pytest.mark.parametrize("name", TINY)
def test_generated_ldm_config_describes_the_model(tiny: dict[str, ModelBundle], name: str) -> None:
    bundle = tiny[name]
    config = original_config(bundle)
    ldm = ldm_state_dict(bundle.unet, bundle.vae, bundle.text_encoder)
    for read_back, model in (
        (create_unet_diffusers_config_from_ldm(config, ldm), bundle.unet),
        (create_vae_diffusers_config_from_ldm(config, ldm), bundle.vae),
    ):
        read_back.pop("sample_size")  # diffusers takes it from its own defaults
        for key, value in read_back.items():
            mine = model.config.get(key)
            as_list = list(mine) if isinstance(mine, (tuple, list)) else mine
            assert (list(value) if isinstance(value, (tuple, list)) else value) == as_list, key
    params = config["model"]["params"]
    assert params["parameterization"] == {"tiny-sd15": "eps", "tiny-sd21": "v"}[name]
    assert ("OpenCLIP" in params["cond_stage_config"]["target"]) == (name == "tiny-sd21")


def test_sd2_config_matches_stabilitys_v2_inference_v() -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from models.builtin import BUILTIN_CONFIGS, load_builtin_tokenizer

    config = BUILTIN_CONFIGS["sd21-random"]
    with init_empty_weights():
        bundle = ModelBundle(
            unet=UNet2DConditionModel.from_config(config["unet"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
            tokenizer=load_builtin_tokenizer(),
            vae=AutoencoderKL.from_config(config["vae"]),
            noise_scheduler=DDPMScheduler.from_config(config["scheduler"]),
            source="sd21-random",
        )
    params = original_config(bundle)["model"]["params"]
    unet = params["unet_config"]["params"]
    assert params["parameterization"] == "v" and params["image_size"] == 96
    assert (params["linear_start"], params["linear_end"]) == (0.00085, 0.012)
    assert unet["num_head_channels"] == 64 and unet["use_linear_in_transformer"] is True
    assert unet["attention_resolutions"] == [4, 2, 1] and unet["channel_mult"] == [1, 2, 4, 4]
    assert unet["context_dim"] == 1024 and unet["model_channels"] == 320
    assert params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 4, 4]
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"


def test_read_prediction_type(tmp_path) -> None:
    from config.errors import UserError

    yaml_file = tmp_path / "m.yaml"
    yaml_file.write_text("model:\n  params:\n    parameterization: v\n")
    assert read_prediction_type(yaml_file) == "v_prediction"
    yaml_file.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert read_prediction_type(yaml_file) == "epsilon"
    yaml_file.write_text("model:\n  params:\n    parameterization: x0\n")
    with pytest.raises(UserError, match="parameterization is 'x0'"):
        read_prediction_type(yaml_file)
    yaml_file.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match=r"m\.yaml .*not a readable LDM config"):
        read_prediction_type(yaml_file)


# --- standard text-encoder keys --------------------------------------------------------------


def test_standard_keys_whatever_transformers_builds(tiny: dict[str, ModelBundle]) -> None:
    encoder = tiny["tiny-sd15"].text_encoder
    standard = standard_text_encoder_state_dict(encoder)
    assert all(k.startswith("text_model.") for k in standard)
    assert len(standard) == len(encoder.state_dict())
    # transformers 4.x layout: the keys already carry text_model. and stay as they are.
    wrapper = torch.nn.Module()
    wrapper.text_model = encoder
    as_v4 = standard_text_encoder_state_dict(wrapper)  # type: ignore[arg-type]
    assert list(as_v4) == list(standard)
