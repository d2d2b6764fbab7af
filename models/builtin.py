"""The built-in models (docs/models.md): their configurations as plain data, and building them.

Every built-in model is built in code from the configurations below after ``torch.manual_seed(0)``
(the caller's RNG state is left as it was), with tokenizer files kept in the repository: the tiny
models use the small tokenizer of ``models/tokenizer/``, the full-size ones the real CLIP tokenizer
of ``models/clip_tokenizer/`` (SD2.x's with ``!`` as its pad token, as in the SD2 diffusers
folders). Nothing is downloaded and every build gives the same weights.

- ``tiny-sd15`` / ``tiny-sd21``: tiny random models shaped like SD1.5 / SD2.1 (12 / 23 text-encoder
  layers, epsilon / v-prediction) that train on a CPU at 64×64 in well under a second a step;
- ``sd15-random`` / ``sd21-random``: the real SD1.5 / SD2.1 architectures at full size with random
  weights, for speed and memory measurements;
- ``tiny-sdxl``: a tiny random model shaped like SDXL (two text encoders of 12 and 32 layers, a
  UNet with SDXL's ``text_time`` conditioning and several transformer layers per block);
- ``sdxl-random``: the real SDXL 1.0 base architecture at full size with random weights.

SDXL configurations have a ``text_encoder_2`` entry (a ``CLIPTextModelWithProjection``); its
tokenizer pads with ``!`` as the ``tokenizer_2/`` of the SDXL diffusers folders does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from config.errors import UserError, did_you_mean
from models.bundle import ModelBundle

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"

# Size and special-token ids of the tokenizer in models/tokenizer/ (tests check they match it).
TINY_VOCAB_SIZE = 1152
TOKENIZER_TOKEN_IDS: dict[str, int] = {
    "bos_token_id": 1150,
    "eos_token_id": 1151,
    "pad_token_id": 1151,
}
# The real CLIP vocabulary size, so the full-size models have the real embedding table.
CLIP_VOCAB_SIZE = 49408
# Special-token ids of the real CLIP tokenizer in models/clip_tokenizer/ (SD1.x pads with eos).
CLIP_TOKEN_IDS: dict[str, int] = {
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# SD2.x's tokenizer pads with "!" (id 0), as the tokenizer/ folder of the SD2 diffusers repos does.
OPEN_CLIP_PAD_TOKEN = "!"
OPEN_CLIP_TOKEN_IDS: dict[str, int] = {**CLIP_TOKEN_IDS, "pad_token_id": 0}
# "!" is id 0 in the tiny tokenizer too, so the tiny SDXL's second tokenizer pads like the real one.
TINY_OPEN_CLIP_TOKEN_IDS: dict[str, int] = {**TOKENIZER_TOKEN_IDS, "pad_token_id": 0}
SEED = 0

_SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

_SD_DOWN_BLOCKS = (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
)
_SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_SD_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _SD_DOWN_BLOCKS,
    "up_block_types": _SD_UP_BLOCKS,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "act_fn": "silu",
}

_SD_VAE: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

_CLIP_VIT_L_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    **CLIP_TOKEN_IDS,
}

_TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
    "act_fn": "silu",
}

_TINY_VAE: dict[str, Any] = {
    **_SD_VAE,
    "sample_size": 64,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

_TINY_TEXT: dict[str, Any] = {
    **_CLIP_VIT_L_TEXT,
    **TOKENIZER_TOKEN_IDS,
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

# SDXL 1.0 base as its diffusers folder ships it: OpenAI CLIP ViT-L/14 (as SD1.x) and OpenCLIP
# ViT-bigG/14 with its projection (all 32 layers), a three-level UNet whose cross-attention sees
# both encoders' hidden states side by side (768 + 1280) and whose ``text_time`` embedding takes
# the pooled projection (1280) and six size/crop numbers of 256 sinusoidal channels each.
_OPEN_CLIP_BIGG_TEXT: dict[str, Any] = {
    **_CLIP_VIT_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    **OPEN_CLIP_TOKEN_IDS,
}
TIME_IDS = 6  # original height, width; crop top, left; target height, width


def _sdxl_unet(
    text: dict[str, Any], text_2: dict[str, Any], time_embed_dim: int, **unet: Any
) -> dict[str, Any]:
    """An SDXL UNet config whose conditioning widths follow from the two text encoders."""
    return {
        **unet,
        "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": text_2["projection_dim"]
        + TIME_IDS * time_embed_dim,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "in_channels": 4,
        "out_channels": 4,
    }


_SDXL_UNET = _sdxl_unet(
    _CLIP_VIT_L_TEXT,
    _OPEN_CLIP_BIGG_TEXT,
    256,
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
)
# Euler in the SDXL folder; the same betas, spacing and offset (training always uses DDPM).
_SDXL_SCHEDULER: dict[str, Any] = {**_SD_SCHEDULER, "timestep_spacing": "leading"}
_SDXL_SCALING_FACTOR = 0.13025

# The tiny SDXL: widths 32 and 64 and a projection to 40, all different, so that a swapped
# encoder or an untransposed projection changes a shape instead of passing unnoticed.
_TINY_TEXT_2: dict[str, Any] = {
    **_TINY_TEXT,
    **TINY_OPEN_CLIP_TOKEN_IDS,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 40,
}
_TINY_SDXL_UNET = _sdxl_unet(
    _TINY_TEXT,
    _TINY_TEXT_2,
    8,
    sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
)

# name -> {"text_encoder" (and SDXL's "text_encoder_2"): CLIPTextConfig kwargs,
#          "unet" / "vae" / "scheduler": diffusers configs}
BUILTIN_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-sd15": {
        "text_encoder": _TINY_TEXT,
        "unet": _TINY_UNET,
        "vae": _TINY_VAE,
        "scheduler": _SD_SCHEDULER,
    },
    "tiny-sd21": {
        "text_encoder": {**_TINY_TEXT, "num_hidden_layers": 23, "hidden_act": "gelu"},
        "unet": {
            **_TINY_UNET,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": _TINY_VAE,
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "sd15-random": {
        "text_encoder": _CLIP_VIT_L_TEXT,
        "unet": _SD_UNET,
        "vae": _SD_VAE,
        "scheduler": _SD_SCHEDULER,
    },
    "sd21-random": {
        # OpenCLIP ViT-H/14 text tower as diffusers ships it: the last of its 24 layers dropped.
        "text_encoder": {
            **_CLIP_VIT_L_TEXT,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "hidden_act": "gelu",
            "projection_dim": 512,
            **OPEN_CLIP_TOKEN_IDS,
        },
        "unet": {
            **_SD_UNET,
            "sample_size": 96,
            "attention_head_dim": (5, 10, 20, 20),
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {**_SD_VAE, "sample_size": 768},
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "tiny-sdxl": {
        "text_encoder": _TINY_TEXT,
        "text_encoder_2": _TINY_TEXT_2,
        "unet": _TINY_SDXL_UNET,
        "vae": {**_TINY_VAE, "scaling_factor": _SDXL_SCALING_FACTOR},
        "scheduler": _SDXL_SCHEDULER,
    },
    "sdxl-random": {
        "text_encoder": _CLIP_VIT_L_TEXT,
        "text_encoder_2": _OPEN_CLIP_BIGG_TEXT,
        "unet": _SDXL_UNET,
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": _SDXL_SCALING_FACTOR},
        "scheduler": _SDXL_SCHEDULER,
    },
}

BUILTIN_MODELS: tuple[str, ...] = tuple(BUILTIN_CONFIGS)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of `BUILTIN_MODELS`."""
    return name in BUILTIN_CONFIGS


def _config(name: str) -> dict[str, dict[str, Any]]:
    if not is_builtin(name):
        raise UserError(
            f"'{name}' is not a built-in model{did_you_mean(name, BUILTIN_MODELS)}; "
            f"built-in models: {', '.join(BUILTIN_MODELS)}"
        )
    return BUILTIN_CONFIGS[name]


def builtin_text_encoder_layers(name: str) -> int:
    """The (first) text encoder's layer count of built-in model ``name``, building nothing."""
    return int(_config(name)["text_encoder"]["num_hidden_layers"])


def builtin_text_encoder_2_layers(name: str) -> int | None:
    """The second text encoder's layer count of an SDXL built-in; None for SD1.x/2.x ones."""
    text_2 = _config(name).get("text_encoder_2")
    return None if text_2 is None else int(text_2["num_hidden_layers"])


def load_builtin_tokenizer(open_clip: bool = False) -> CLIPTokenizer:
    """The tiny CLIP tokenizer of ``models/tokenizer/``; it pads with ``!`` if ``open_clip``."""
    if open_clip:
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=OPEN_CLIP_PAD_TOKEN)
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def load_clip_tokenizer(open_clip: bool) -> CLIPTokenizer:
    """The real CLIP tokenizer kept in ``models/clip_tokenizer/``; SD2.x's pads with ``!``."""
    if open_clip:
        return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token=OPEN_CLIP_PAD_TOKEN)
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def tokenizer_for(text: dict[str, Any]) -> CLIPTokenizer:
    """The tokenizer of a text-encoder config: its embedding table's size picks the files, its
    pad token id (0 is ``!``) the padding."""
    pads_with_exclamation_mark = text["pad_token_id"] == 0
    if text["vocab_size"] == CLIP_VOCAB_SIZE:
        return load_clip_tokenizer(open_clip=pads_with_exclamation_mark)
    assert text["vocab_size"] == TINY_VOCAB_SIZE, f"no tokenizer for {text['vocab_size']} tokens"
    return load_builtin_tokenizer(open_clip=pads_with_exclamation_mark)


def builtin_tokenizer(name: str) -> CLIPTokenizer:
    """The (first) tokenizer of built-in model ``name``."""
    return tokenizer_for(_config(name)["text_encoder"])


def builtin_tokenizer_2(name: str) -> CLIPTokenizer | None:
    """SDXL's second tokenizer of built-in model ``name`` (pads with ``!``); None for SD1.x/2.x."""
    text_2 = _config(name).get("text_encoder_2")
    return None if text_2 is None else tokenizer_for(text_2)


def build_builtin(name: str) -> ModelBundle:
    """Build built-in model ``name`` (deterministic weights, no download).

    The components are returned in eval mode, like ``from_pretrained`` returns them.
    """
    config = _config(name)
    logger.info("building built-in model %s (random weights, seed %d)", name, SEED)
    text_encoder_2 = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        unet = UNet2DConditionModel.from_config(config["unet"])
        vae = AutoencoderKL.from_config(config["vae"])
        if "text_encoder_2" in config:
            text_config_2 = CLIPTextConfig(**config["text_encoder_2"])
            text_encoder_2 = CLIPTextModelWithProjection(text_config_2).eval()
    return ModelBundle(
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=builtin_tokenizer(name),
        vae=vae.eval(),
        noise_scheduler=DDPMScheduler.from_config(config["scheduler"]),
        source=name,
        text_encoder_2=text_encoder_2,
        tokenizer_2=builtin_tokenizer_2(name),
    )
