"""Helpers for the LoRA tests: tiny adapted models, fixed inputs, base pipelines."""

from __future__ import annotations

import functools
from collections.abc import Collection

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lora.adapters import adapter_parameters
from lora.inject import add_lora_adapters
from lora.kohya import KohyaInfo
from lora.settings import LoraSettings
from models import ModelBundle
from models.builtin import build_builtin
from models.ldm_layout import uses_open_clip
from models.pipeline_folder import pipeline_of

RANK4 = LoraSettings.of(4, alpha=2.0)
LOCON = LoraSettings.of(4, alpha=2.0, conv_rank=2, conv_alpha=1.0)


def adapted(
    name: str,
    settings: LoraSettings = RANK4,
    frozen: Collection[int] = (),
    train_unet: bool = True,
    train_text_encoder: bool = True,
    seed: int = 1,
) -> ModelBundle:
    """Built-in ``name`` with adapters whose up weights are random (so they change outputs),
    every adapter weight rounded to a value fp16 holds (so an fp16 file is exact)."""
    bundle = build_builtin(name)
    add_lora_adapters(bundle, settings, train_unet, train_text_encoder, frozen, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (bundle.unet, *bundle.text_encoders):
            for key, p in adapter_parameters(model).items():
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                p.copy_(p.half().float())
    return bundle


def models_of(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    return bundle.named_models()


def info_of(bundle: ModelBundle, name: str = "run") -> KohyaInfo:
    return KohyaInfo(
        output_name=name,
        training_started_at=1700000000.5,
        steps=12,
        epoch=3,
        v2=uses_open_clip(bundle.text_encoder),
        v_prediction=bundle.prediction_type == "v_prediction",
        sdxl=bundle.family == "sdxl",
        resolution=64,
        base_model=bundle.source,
    )


def base_pipeline(name: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A fresh pipeline of built-in ``name``, as a user would load the base model."""
    bundle = build_builtin(name)
    return pipeline_of(bundle, bundle.noise_scheduler)


def outputs(
    unet: torch.nn.Module, text_encoder: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states, UNet output) on fixed inputs; the UNet gets fixed
    conditioning, so each output shows its own model's adapters only."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 8), generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    width = unet.config.cross_attention_dim
    condition = torch.randn(1, 8, width, generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
        sample = unet(latents, torch.tensor([700]), condition).sample
    return hidden, sample


@functools.cache
def base_outputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`outputs` of built-in ``name`` without adapters."""
    bundle = build_builtin(name)
    return outputs(bundle.unet, bundle.text_encoder)
