"""``resume_ckpt`` → `ModelBundle`: a built-in name, a local diffusers folder or a hub id.

How a value is read:

1. one of `BUILTIN_MODELS` → built in code (see `models.builtin`);
2. an existing path → it must be a diffusers Stable Diffusion folder (what
   ``StableDiffusionPipeline.save_pretrained`` writes); each component is loaded with
   ``from_pretrained(folder, subfolder=...)``;
3. ``owner/name`` (the shape of every hub id) → loaded the same way from the Hugging Face hub,
   which needs a network;
4. anything else (a missing path, a name with no ``/`` that is not built in) → `UserError`.
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from config.errors import UserError, did_you_mean
from models.builtin import BUILTIN_MODELS, build_builtin, is_builtin
from models.bundle import ModelBundle

logger = logging.getLogger(__name__)

# Files a diffusers Stable Diffusion folder needs, per subfolder (any one of each tuple).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}

# A Hugging Face hub model id: exactly "owner/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

# Components are loaded in float32 whatever the files hold; mixed precision is the trainer's job.
LOAD_DTYPE = torch.float32


class SourceKind(str, Enum):
    """Where a ``resume_ckpt`` value points."""

    BUILTIN = "builtin"
    LOCAL = "local"
    HUB = "hub"


def _alternatives(value: str) -> str:
    return (
        f"{did_you_mean(value, BUILTIN_MODELS)}. resume_ckpt takes a diffusers Stable Diffusion "
        f"folder, a hub id (owner/name, needs a network) or a built-in model: "
        f"{', '.join(BUILTIN_MODELS)}"
    )


def missing_files(folder: Path) -> list[str]:
    """What ``folder`` lacks to be a diffusers Stable Diffusion folder (empty when nothing)."""
    missing = []
    for sub, names in REQUIRED_FILES.items():
        if not (folder / sub).is_dir():
            missing.append(f"{sub}/")
        elif not any((folder / sub / name).is_file() for name in names):
            missing.append(" or ".join(f"{sub}/{name}" for name in names))
    return missing


def classify_resume_ckpt(resume_ckpt: str) -> SourceKind:
    """Which kind of source ``resume_ckpt`` is, checking what can be checked without loading.

    Raises `UserError` for a local path that is missing or is not a diffusers Stable Diffusion
    folder, and for a value that is neither a built-in name, a path nor a hub id. Config
    validation can call this before any model is built.
    """
    if is_builtin(resume_ckpt):
        return SourceKind.BUILTIN
    path = Path(resume_ckpt).expanduser()
    if path.is_file():
        raise UserError(
            f"resume_ckpt: '{resume_ckpt}' is a file; single-file checkpoints (.ckpt, "
            f".safetensors) are not supported, convert it to a diffusers folder first"
            f"{_alternatives(resume_ckpt)}"
        )
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise UserError(
                f"resume_ckpt: '{resume_ckpt}' is not a diffusers Stable Diffusion folder: "
                f"missing {', '.join(missing)}{_alternatives(resume_ckpt)}"
            )
        return SourceKind.LOCAL
    if _HUB_ID.fullmatch(resume_ckpt) is not None and ".." not in resume_ckpt:
        return SourceKind.HUB
    raise UserError(
        f"resume_ckpt: '{resume_ckpt}' is not a built-in model and no such folder exists "
        f"({path.absolute()}){_alternatives(resume_ckpt)}"
    )


def _load_components(source: str, local_files_only: bool) -> ModelBundle:
    """Each component of the diffusers folder or hub repo ``source`` via ``from_pretrained``."""
    options = {"local_files_only": local_files_only}
    return ModelBundle(
        unet=UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=LOAD_DTYPE, **options
        ),
        text_encoder=CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=LOAD_DTYPE, **options
        ),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **options),
        vae=AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=LOAD_DTYPE, **options
        ),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **options),
        source=source,
    )


def load_models(resume_ckpt: str) -> ModelBundle:
    """Load (or build) the model named by ``resume_ckpt``; see the module docstring.

    The training noise scheduler is always a ``DDPMScheduler`` made from the source's scheduler
    configuration (betas, ``prediction_type``), whatever scheduler class the folder names.
    """
    kind = classify_resume_ckpt(resume_ckpt)
    if kind is SourceKind.BUILTIN:
        return build_builtin(resume_ckpt)
    if kind is SourceKind.LOCAL:
        folder = str(Path(resume_ckpt).expanduser())
        logger.info("loading diffusers model from folder %s", folder)
        try:
            bundle = _load_components(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise UserError(f"resume_ckpt: could not load '{resume_ckpt}': {error}") from error
        bundle.source = resume_ckpt
        return bundle
    logger.info("loading diffusers model %s from the Hugging Face hub", resume_ckpt)
    try:
        return _load_components(resume_ckpt, local_files_only=False)
    except OSError as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise UserError(
            f"resume_ckpt: '{resume_ckpt}' could not be found locally (no folder "
            f"{Path(resume_ckpt).absolute()}) nor downloaded from the Hugging Face hub "
            f"({first_line}){_alternatives(resume_ckpt)}"
        ) from error
