"""A `ModelBundle` as a diffusers pipeline folder, the weights part of a checkpoint.

`write_pipeline_folder` writes what ``save_pretrained`` of the family's pipeline writes
(safetensors; no safety checker, no watermarker): ``StableDiffusionPipeline`` for SD1.x/2.x,
``StableDiffusionXLPipeline`` for SDXL (with ``text_encoder_2/`` and ``tokenizer_2/``), so that
the same class's ``from_pretrained(folder)`` and `models.load_models` load it as it is. The
weights are fp16 unless full precision; the text encoders' files use the standard
``text_model.`` keys (`models.text_keys`), and their configs say to load in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from models.bundle import SDXL, ModelBundle
from models.copies import converted_copy
from models.text_keys import standardize_text_encoder_file

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def write_pipeline_folder(folder: Path, bundle: ModelBundle, full_precision: bool) -> None:
    """Write the bundle's pipeline into ``folder`` in fp32 or fp16; the models are left as they
    are (dtype, device, values): fp16 weights are written from CPU copies.

    ``folder`` may exist (``save_pretrained`` writes into it); atomic replacement of a previous
    checkpoint is the caller's business.
    """
    dtype = torch.float32 if full_precision else torch.float16
    with _pipeline(bundle, dtype) as pipeline:
        pipeline.save_pretrained(folder, safe_serialization=True)
        for name in TEXT_ENCODERS:
            text_encoder = getattr(pipeline, name, None)
            if text_encoder is None:
                continue
            standardize_text_encoder_file(text_encoder, Path(folder) / name)
            if dtype != torch.float32:
                _default_load_dtype_float32(Path(folder) / name / "config.json")


def pipeline_of(bundle: ModelBundle, scheduler: Any) -> DiffusionPipeline:
    """The family's diffusers pipeline around the bundle's own modules (no copies):
    ``StableDiffusionXLPipeline`` for SDXL (no watermarker), else ``StableDiffusionPipeline``
    (no safety checker)."""
    common = {
        "vae": bundle.vae,
        "text_encoder": bundle.text_encoder,
        "tokenizer": bundle.tokenizer,
        "unet": bundle.unet,
        "scheduler": scheduler,
    }
    if bundle.family == SDXL:
        return StableDiffusionXLPipeline(
            **common,
            text_encoder_2=bundle.text_encoder_2,
            tokenizer_2=bundle.tokenizer_2,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@contextlib.contextmanager
def _pipeline(bundle: ModelBundle, dtype: torch.dtype) -> Iterator[DiffusionPipeline]:
    """The family's pipeline of the bundle's models in ``dtype`` (copies where they differ),
    for the ``with`` block."""
    with contextlib.ExitStack() as copies:
        models = {"vae": bundle.vae, **bundle.named_models()}
        in_dtype = {name: _in_dtype(model, dtype, copies) for name, model in models.items()}
        # A copy: the pipeline's constructor may rewrite an old-style scheduler config in place.
        scheduler = type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config)
        yield pipeline_of(dataclasses.replace(bundle, **in_dtype), scheduler)


def _default_load_dtype_float32(config_file: Path) -> None:
    """Make ``from_pretrained`` load the fp16 text encoder in fp32 unless told otherwise.

    transformers loads in the config's ``dtype`` by default, diffusers in fp32: without this a
    plain ``from_pretrained(path)`` of the pipeline would mix fp16 and fp32 and fail.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _floating_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


def _in_dtype(
    model: torch.nn.Module, dtype: torch.dtype, copies: contextlib.ExitStack
) -> torch.nn.Module:
    """``model`` itself when already all ``dtype``, else a CPU copy in ``dtype`` that lives
    until ``copies`` closes (`models.copies.converted_copy`)."""
    if _floating_dtypes(model) <= {dtype}:
        return model
    return copies.enter_context(converted_copy(model, dtype))
