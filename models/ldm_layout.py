"""Diffusers → original Stable Diffusion (LDM) keys: the direction diffusers has no function for.

A single-file checkpoint as AUTOMATIC1111, ComfyUI and model sites use it holds every weight in
the layout of the original CompVis/Stability code:

- ``model.diffusion_model.*``: the UNet (``input_blocks``, ``middle_block``, ``output_blocks``);
- ``first_stage_model.*``: the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` with 1×1 convs);
- ``cond_stage_model.transformer.text_model.*``: SD1.x's OpenAI CLIP text encoder, in the keys of
  transformers' ``CLIPTextModel``;
- ``cond_stage_model.model.*``: SD2.x's OpenCLIP text encoder (``transformer.resblocks.N`` with
  fused ``in_proj`` query/key/value, ``token_embedding``, ``positional_embedding``, ``ln_final``,
  ``text_projection``);
- SDXL instead: ``conditioner.embedders.0.transformer.text_model.*`` (OpenAI CLIP ViT-L/14, as
  SD1.x's) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG/14 in OpenCLIP's layout,
  with its real ``text_projection``, stored as OpenCLIP multiplies by it: width × projection, the
  transpose of the ``nn.Linear`` weight of transformers). Its UNet adds ``label_emb.0.{0,2}``
  (diffusers' ``add_embedding``, the pooled-text-and-time-ids embedding).

The mapping is computed from each model's configuration (number of blocks, layers per block,
which blocks have attention), so it covers the tiny built-in models as well as the full-size ones.
The way back (LDM → diffusers) is diffusers' own ``diffusers.loaders.single_file_utils``; tests
check that it undoes this mapping exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from models.bundle import uses_open_clip
from models.text_keys import standard_text_encoder_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1.x: OpenAI CLIP in transformers' keys
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x: OpenCLIP
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's first encoder, CLIP's keys
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second encoder, OpenCLIP's
TEXT_PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's projection

# Converts one tensor as it is written (dtype, device); the identity keeps the model's tensors.
Convert = Callable[[torch.Tensor], torch.Tensor]

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _replace_prefix(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _resnet(rest: str) -> str:
    renamed = _replace_prefix(rest, _UNET_RESNET)
    if renamed is None:
        raise KeyError(f"unknown UNet resnet weight '{rest}'")
    return renamed


# --- text encoder ----------------------------------------------------------------------------


def clip_to_ldm(
    standard: dict[str, torch.Tensor], convert: Convert, prefix: str = CLIP_PREFIX
) -> Iterator[tuple[str, Any]]:
    """SD1.x (and SDXL's first encoder): the transformers keys under ``prefix``."""
    for key, tensor in standard.items():
        yield prefix + key, convert(tensor)


def open_clip_to_ldm(
    standard: dict[str, torch.Tensor],
    hidden_size: int,
    convert: Convert,
    prefix: str = OPEN_CLIP_PREFIX,
) -> Iterator[tuple[str, Any]]:
    """SD2.x (and SDXL's second encoder): OpenCLIP's keys under ``prefix``, q/k/v fused.

    A ``CLIPTextModelWithProjection`` (SDXL) has a ``text_projection``: it is written transposed,
    as OpenCLIP stores it. ``CLIPTextModel`` (SD2.x) has none (SD2.x conditions on the
    penultimate layer's hidden states, never on the projected pooled output); an identity of
    OpenCLIP's shape (hidden × hidden) is written in its place so the file has every key UIs
    expect.
    """
    text_projection = standard.get(TEXT_PROJECTION)
    standard = {k: v for k, v in standard.items() if k != TEXT_PROJECTION}
    layer = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in standard.items():
        top = _OPEN_CLIP_TOP.get(key)
        if top is not None:
            yield prefix + top, convert(tensor)
            continue
        match = layer.fullmatch(key)
        if match is None:
            raise KeyError(f"unknown text-encoder weight '{key}'")
        index, rest = match.groups()
        projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if projection is not None:
            target = f"transformer.resblocks.{index}.attn.in_proj_{projection.group(2)}"
            fused.setdefault(target, {})[projection.group(1)] = tensor
            continue
        renamed = _replace_prefix(rest, _OPEN_CLIP_LAYER)
        if renamed is None:
            raise KeyError(f"unknown text-encoder weight '{key}'")
        yield f"{prefix}transformer.resblocks.{index}.{renamed}", convert(tensor)
    for target, parts in fused.items():
        assert sorted(parts) == ["k", "q", "v"], f"{target}: incomplete query/key/value"
        yield prefix + target, convert(torch.cat([parts[p] for p in "qkv"]))
    if text_projection is None:
        text_projection = torch.eye(hidden_size, dtype=next(iter(standard.values())).dtype)
    else:
        text_projection = text_projection.T  # OpenCLIP: x @ projection; nn.Linear: x @ weight.T
    yield prefix + "text_projection", convert(text_projection)


# --- UNet ------------------------------------------------------------------------------------


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """The LDM key (without ``model.diffusion_model.``) of a diffusers UNet weight."""
    top = _replace_prefix(key, _UNET_TOP)
    if top is not None:
        return top
    per_block = int(config["layers_per_block"]) + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = match.groups()
        index = 1 + int(block) * per_block + int(layer)
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block, rest = match.groups()
        return f"input_blocks.{(int(block) + 1) * per_block}.0.op.{rest}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match.group(1))}.{_resnet(match.group(2))}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match.group(1)}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = match.groups()
        index = int(block) * per_block + int(layer)
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block, rest = match.groups()
        has_attention = "CrossAttn" in config["up_block_types"][int(block)]
        index = int(block) * per_block + per_block - 1
        return f"output_blocks.{index}.{2 if has_attention else 1}.conv.{rest}"
    raise KeyError(f"unknown UNet weight '{key}'")


def unet_to_ldm(unet: UNet2DConditionModel, convert: Convert) -> Iterator[tuple[str, Any]]:
    """The UNet's weights under ``model.diffusion_model.`` in the LDM layout."""
    config = dict(unet.config)
    for key, tensor in unet.state_dict().items():
        yield UNET_PREFIX + unet_key_to_ldm(key, config), convert(tensor)


# --- VAE -------------------------------------------------------------------------------------


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """The LDM key (without ``first_stage_model.``) of a diffusers VAE weight."""
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{match.group(1)}.norm_out.{match.group(2)}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block, layer, rest = match.groups()
        return f"encoder.down.{block}.block.{layer}.{_vae_resnet(rest)}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{match.group(1)}.downsample.{match.group(2)}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block, layer, rest = match.groups()
        return f"decoder.up.{num_blocks - 1 - int(block)}.block.{layer}.{_vae_resnet(rest)}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(match.group(1))}.upsample.{match.group(2)}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        part, layer, rest = match.groups()
        return f"{part}.mid.block_{int(layer) + 1}.{_vae_resnet(rest)}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        renamed = _replace_prefix(match.group(2), _VAE_ATTENTION)
        if renamed is None:
            raise KeyError(f"unknown VAE attention weight '{key}'")
        return f"{match.group(1)}.mid.attn_1.{renamed}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\..+|(post_)?quant_conv\..+", key):
        return key
    raise KeyError(f"unknown VAE weight '{key}'")


def _vae_resnet(rest: str) -> str:
    if rest.startswith("conv_shortcut."):
        return "nin_shortcut." + rest[len("conv_shortcut.") :]
    return rest


def vae_to_ldm(vae: AutoencoderKL, convert: Convert) -> Iterator[tuple[str, Any]]:
    """The VAE's weights under ``first_stage_model.``; attention projections as 1×1 convs."""
    num_blocks = len(vae.config.block_out_channels)
    for key, tensor in vae.state_dict().items():
        ldm_key = vae_key_to_ldm(key, num_blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        yield VAE_PREFIX + ldm_key, convert(tensor)


# --- all of it -------------------------------------------------------------------------------


def text_to_ldm(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection | None,
    convert: Convert,
) -> Iterator[tuple[str, Any]]:
    """The text encoder(s) in the LDM layout: SD1.x, SD2.x, or SDXL's two."""
    standard = standard_text_encoder_state_dict(text_encoder)
    if text_encoder_2 is not None:
        yield from clip_to_ldm(standard, convert, SDXL_CLIP_PREFIX)
        hidden_size = int(text_encoder_2.config.hidden_size)
        standard_2 = standard_text_encoder_state_dict(text_encoder_2)
        yield from open_clip_to_ldm(standard_2, hidden_size, convert, SDXL_OPEN_CLIP_PREFIX)
    elif uses_open_clip(text_encoder):
        hidden_size = int(text_encoder.config.hidden_size)
        yield from open_clip_to_ldm(standard, hidden_size, convert)
    else:
        yield from clip_to_ldm(standard, convert)


def ldm_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    convert: Convert = lambda tensor: tensor,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> dict[str, torch.Tensor]:
    """Every weight of the models in the LDM layout, each passed through ``convert``.

    ``text_encoder_2`` (SDXL's second encoder) makes it the SDXL layout. With the identity the
    values are the models' own tensors (or views of them), so no copy is made; query/key/value
    fusing in the OpenCLIP text encoders makes the only new tensors.
    """
    text = text_to_ldm(text_encoder, text_encoder_2, convert)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in (*unet_to_ldm(unet, convert), *vae_to_ldm(vae, convert), *text):
        assert key not in out, f"two weights map to {key}"
        out[key] = tensor
    return out
