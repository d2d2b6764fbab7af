"""The original (LDM) inference config of a model, the ``.yaml`` UIs read beside a single file.

AUTOMATIC1111 and ComfyUI read ``model.params.parameterization: "v"`` from a ``.yaml`` with the
same name as a ``.safetensors`` file to know that the model predicts v (SD2.x 768 models); without
it they assume epsilon and make noise. EveryDream2 copies Stability's ``v2-inference-v.yaml``
beside every v-prediction checkpoint; here the file is generated from the model's own
configuration (the same keys and values as Stability's file for the real architectures), so it
also describes the tiny built-in models and SD1.x models trained with v-prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from config.errors import UserError
from models.bundle import SDXL, ModelBundle, uses_open_clip

V_PREDICTION = "v_prediction"
EPSILON = "epsilon"
# LDM's name for each prediction type (model.params.parameterization).
PARAMETERIZATION = {EPSILON: "eps", V_PREDICTION: "v"}


def _unet_params(config: dict[str, Any]) -> dict[str, Any]:
    channels = list(config["block_out_channels"])
    model_channels = channels[0]
    attention = [
        2**index for index, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind
    ]
    params: dict[str, Any] = {
        "use_checkpoint": True,
        "use_fp16": True,
        "image_size": 32,  # unused by LDM
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "model_channels": model_channels,
        "attention_resolutions": sorted(attention, reverse=True),
        "num_res_blocks": config["layers_per_block"],
        "channel_mult": [c // model_channels for c in channels],
    }
    heads = config["attention_head_dim"]
    if isinstance(heads, int):
        params["num_heads"] = heads
    else:  # per-block head counts (SD2.x): LDM gives the channels per head instead
        per_head = {c // h for c, h in zip(channels, heads, strict=True)}
        assert len(per_head) == 1, f"attention heads {heads} have no common width"
        params["num_head_channels"] = per_head.pop()
    params |= {
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "transformer_depth": 1,
        "context_dim": config["cross_attention_dim"],
        "legacy": False,
    }
    return params


def _vae_params(config: dict[str, Any]) -> dict[str, Any]:
    channels = list(config["block_out_channels"])
    return {
        "embed_dim": config["latent_channels"],
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True,
            "z_channels": config["latent_channels"],
            "resolution": 256,
            "in_channels": config["in_channels"],
            "out_ch": config["out_channels"],
            "ch": channels[0],
            "ch_mult": [c // channels[0] for c in channels],
            "num_res_blocks": config["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def original_config(bundle: ModelBundle) -> dict[str, Any]:
    """The LDM inference config (as Stability's ``v1-inference.yaml``/``v2-inference-v.yaml``).

    SD1.x/2.x only: SDXL single files mark v-prediction with a ``v_pred`` key instead.
    """
    assert bundle.family != SDXL, "SDXL single files carry no .yaml"
    scheduler = bundle.noise_scheduler.config
    if uses_open_clip(bundle.text_encoder):
        text = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
    else:
        text = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "parameterization": PARAMETERIZATION[bundle.prediction_type],
                "linear_start": scheduler.beta_start,
                "linear_end": scheduler.beta_end,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": scheduler.num_train_timesteps,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": bundle.unet.config.sample_size,
                "channels": bundle.unet.config.in_channels,
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": bundle.vae.config.scaling_factor,
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": _unet_params(dict(bundle.unet.config)),
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": _vae_params(dict(bundle.vae.config)),
                },
                "cond_stage_config": text,
            },
        }
    }


def original_config_yaml(bundle: ModelBundle) -> str:
    """`original_config` as YAML text."""
    return yaml.safe_dump(original_config(bundle), sort_keys=False)


def read_prediction_type(yaml_file: Path) -> str:
    """The prediction type an LDM ``.yaml`` declares: ``parameterization: "v"`` or epsilon.

    A file that does not parse, or is not an LDM config, is a `UserError` naming it.
    """
    try:
        document = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
        params = document["model"]["params"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as error:
        raise UserError(
            f"resume_ckpt: {yaml_file} (beside the single file) is not a readable LDM config "
            f"with model.params ({type(error).__name__}: {error}); fix or remove it, or set "
            f"prediction_type"
        ) from error
    value = params.get("parameterization", "eps") if isinstance(params, dict) else "eps"
    if value == "v":
        return V_PREDICTION
    if value == "eps":
        return EPSILON
    raise UserError(
        f"resume_ckpt: {yaml_file}: model.params.parameterization is {value!r}; this trainer "
        f"knows 'eps' and 'v'. Fix or remove the file, or set prediction_type"
    )
