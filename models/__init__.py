"""Stable Diffusion models: the built-in ones, loading ``resume_ckpt``, CLIP text encoding."""

from models.builtin import BUILTIN_MODELS, builtin_text_encoder_layers, is_builtin
from models.bundle import ModelBundle
from models.loading import classify_resume_ckpt, load_models
from models.text import encode_prompts, text_encoder_num_layers, text_encoder_parts, tokenize

__all__ = [
    "BUILTIN_MODELS",
    "ModelBundle",
    "builtin_text_encoder_layers",
    "classify_resume_ckpt",
    "encode_prompts",
    "is_builtin",
    "load_models",
    "text_encoder_num_layers",
    "text_encoder_parts",
    "tokenize",
]
