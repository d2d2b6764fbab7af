"""Stable Diffusion 1.x/2.x/XL models: the built-in ones, loading ``resume_ckpt``, text encoding."""

from models.builtin import BUILTIN_MODELS, builtin_text_encoder_layers, is_builtin
from models.bundle import ModelBundle
from models.loading import classify_resume_ckpt, load_models
from models.sdxl import add_time_ids, added_cond_kwargs
from models.text import (
    encode_prompts,
    encode_prompts_sdxl,
    text_encoder_num_layers,
    text_encoder_parts,
    tokenize,
)

__all__ = [
    "BUILTIN_MODELS",
    "ModelBundle",
    "add_time_ids",
    "added_cond_kwargs",
    "builtin_text_encoder_layers",
    "classify_resume_ckpt",
    "encode_prompts",
    "encode_prompts_sdxl",
    "is_builtin",
    "load_models",
    "text_encoder_num_layers",
    "text_encoder_parts",
    "tokenize",
]
