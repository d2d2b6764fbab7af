"""The built-in models (docs/models.md): their configurations as plain data, and building them.

Every built-in model is built in code from the configurations below after ``torch.manual_seed(0)``
(the caller's RNG state is left as it was), with tokenizer files kept in the repository: the tiny
models use the small tokenizer of ``models/tokenizer/``, the full-size ones the real CLIP tokenizer
of ``models/clip_tokenizer/`` (SD2.x's with ``!`` as its pad token, as in the SD2 diffusers
folders). Nothing is downloaded and every build gives the same weights.

- ``tiny-sd15`` / ``tiny-sd21``: tiny random models shaped like SD1.5 / SD2.1 (12 / 23 text-encoder
  layers, epsilon / v-prediction) that train on a CPU at 64×64 in well under a second a step;
- ``sd15-random`` / ``sd21-random``: the real SD1.5 / SD2.1 architectures at full size with random
  weights, for speed and memory measurements.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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

# name -> {"text_encoder": CLIPTextConfig kwargs, "unet" / "vae" / "scheduler": diffusers configs}
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
    """The text encoder's layer count of built-in model ``name``, without building anything."""
    return int(_config(name)["text_encoder"]["num_hidden_layers"])


def load_builtin_tokenizer() -> CLIPTokenizer:
    """The tiny CLIP tokenizer kept in ``models/tokenizer/``."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def load_clip_tokenizer(open_clip: bool) -> CLIPTokenizer:
    """The real CLIP tokenizer kept in ``models/clip_tokenizer/``; SD2.x's pads with ``!``."""
    if open_clip:
        return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token=OPEN_CLIP_PAD_TOKEN)
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def builtin_tokenizer(name: str) -> CLIPTokenizer:
    """The tokenizer of built-in model ``name``: chosen by its embedding table's size."""
    text = _config(name)["text_encoder"]
    if text["vocab_size"] == CLIP_VOCAB_SIZE:
        return load_clip_tokenizer(open_clip=text["hidden_act"] == "gelu")
    assert text["vocab_size"] == TINY_VOCAB_SIZE, f"no tokenizer for {name}"
    return load_builtin_tokenizer()


def build_builtin(name: str) -> ModelBundle:
    """Build built-in model ``name`` (deterministic weights, no download).

    The components are returned in eval mode, like ``from_pretrained`` returns them.
    """
    config = _config(name)
    logger.info("building built-in model %s (random weights, seed %d)", name, SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        unet = UNet2DConditionModel.from_config(config["unet"])
        vae = AutoencoderKL.from_config(config["vae"])
    return ModelBundle(
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=builtin_tokenizer(name),
        vae=vae.eval(),
        noise_scheduler=DDPMScheduler.from_config(config["scheduler"]),
        source=name,
    )
