"""``resume_ckpt`` → `ModelBundle`: a built-in name, a local folder or single file, or a hub id.

How a value is read:

1. one of `BUILTIN_MODELS` → built in code (see `models.builtin`);
2. an existing file ending in ``.safetensors`` or ``.ckpt`` → a single-file checkpoint in the
   original Stable Diffusion layout (see `models.single_file_load`);
3. an existing folder → it must be a diffusers Stable Diffusion folder (what
   ``StableDiffusionPipeline.save_pretrained`` or ``StableDiffusionXLPipeline.save_pretrained``
   writes); each component is loaded with ``from_pretrained(folder, subfolder=...)``. A folder
   is SDXL when its ``model_index.json`` names a ``text_encoder_2`` (or, without one, when it
   has a ``text_encoder_2/`` folder): then ``text_encoder_2/`` and ``tokenizer_2/`` load too;
4. ``owner/name`` (the shape of every hub id) → loaded the same way from the local Hugging Face
   cache, else downloaded from the hub (SD or SDXL by its ``model_index.json``); without a
   network that fails at once with one line;
5. anything else (a missing path, a name with no ``/`` that is not built in) → `UserError`.

The prediction type of any of them can be overridden (train.json's ``prediction_type``).

Without weights (``load_models(..., weights=False)``, what ``--dry_run`` asks for), a built-in
model is built on the meta device and a single file's tensors come from its header: the models
have every parameter's shape and dtype and no data. A folder or a hub model loads whole.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from enum import Enum
from pathlib import Path

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from config.errors import UserError, did_you_mean
from models.builtin import (
    BUILTIN_MODELS,
    build_builtin,
    builtin_text_encoder_2_layers,
    is_builtin,
)
from models.bundle import ModelBundle
from models.single_file import SINGLE_FILE_SUFFIXES, is_single_file
from models.single_file_load import load_single_file, single_file_layout

logger = logging.getLogger(__name__)

# Files a diffusers Stable Diffusion folder needs, per subfolder (any one of each tuple).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
# What an SDXL folder needs besides.
REQUIRED_FILES_SDXL: dict[str, tuple[str, ...]] = {
    "text_encoder_2": ("config.json",),
    "tokenizer_2": ("vocab.json", "tokenizer.json"),
}
MODEL_INDEX = "model_index.json"
SECOND_ENCODER = "text_encoder_2"

# A Hugging Face hub model id: exactly "owner/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

# Components are loaded in float32 whatever the files hold; mixed precision is the trainer's job.
LOAD_DTYPE = torch.float32
# Seconds to wait for the hub before saying it cannot be reached.
HUB_TIMEOUT = 10.0
PREDICTION_TYPES = ("epsilon", "v_prediction")


class SourceKind(str, Enum):
    """Where a ``resume_ckpt`` value points."""

    BUILTIN = "builtin"
    LOCAL = "local"
    SINGLE_FILE = "single_file"
    HUB = "hub"


def _alternatives(value: str) -> str:
    return (
        f"{did_you_mean(value, BUILTIN_MODELS)}. resume_ckpt takes a diffusers Stable Diffusion "
        f"folder, a single file ({' or '.join(SINGLE_FILE_SUFFIXES)}), a hub id (owner/name, "
        f"needs a network), findlast, or a built-in model: {', '.join(BUILTIN_MODELS)}"
    )


def folder_is_sdxl(folder: Path) -> bool:
    """Whether a diffusers folder is SDXL's: its ``model_index.json`` names a second text
    encoder; without a readable one, whether it has a ``text_encoder_2/`` folder."""
    try:
        index = json.loads((Path(folder) / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (Path(folder) / SECOND_ENCODER).is_dir()
    return _names_second_encoder(index)


def _names_second_encoder(index: object) -> bool:
    """Whether a ``model_index.json`` document names a ``text_encoder_2`` component."""
    if not isinstance(index, dict):
        return False
    entry = index.get(SECOND_ENCODER)
    return isinstance(entry, list) and any(part is not None for part in entry)


def missing_files(folder: Path) -> list[str]:
    """What ``folder`` lacks to be a diffusers Stable Diffusion (or SDXL) folder."""
    missing = []
    required = dict(REQUIRED_FILES)
    if folder_is_sdxl(folder):
        required |= REQUIRED_FILES_SDXL
    for sub, names in required.items():
        if not (folder / sub).is_dir():
            missing.append(f"{sub}/")
        elif not any((folder / sub / name).is_file() for name in names):
            missing.append(" or ".join(f"{sub}/{name}" for name in names))
    return missing


def classify_resume_ckpt(resume_ckpt: str) -> SourceKind:
    """Which kind of source ``resume_ckpt`` is, checking what can be checked without loading.

    Raises `UserError` for a local path that is missing, a file that is not a single-file
    checkpoint, a folder that is not a diffusers Stable Diffusion folder, and a value that is
    neither a built-in name, a path nor a hub id. Config validation can call this before any
    model is built.
    """
    if is_builtin(resume_ckpt):
        return SourceKind.BUILTIN
    path = Path(resume_ckpt).expanduser()
    if path.is_file():
        if is_single_file(path):
            return SourceKind.SINGLE_FILE
        raise UserError(
            f"resume_ckpt: '{resume_ckpt}' is a file but not a single-file checkpoint (its name "
            f"must end in {' or '.join(SINGLE_FILE_SUFFIXES)}){_alternatives(resume_ckpt)}"
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
    with warnings.catch_warnings():
        # diffusers passes an argument huggingface_hub 2.x deprecates; not the user's concern.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        return _from_pretrained(source, options)


def is_sdxl(resume_ckpt: str) -> bool | None:
    """Whether ``resume_ckpt`` is an SDXL model, told without loading it: a built-in's config, a
    folder's ``model_index.json``, a ``.safetensors`` file's header, a hub repo's
    ``model_index.json`` (cached, else downloaded once the hub answers quickly). None when it
    cannot be told (a ``.ckpt`` file; a hub id offline: loading it reports that)."""
    kind = classify_resume_ckpt(resume_ckpt)
    if kind is SourceKind.BUILTIN:
        return builtin_text_encoder_2_layers(resume_ckpt) is not None
    if kind is SourceKind.LOCAL:
        return folder_is_sdxl(Path(resume_ckpt).expanduser())
    if kind is SourceKind.SINGLE_FILE:
        layout = single_file_layout(Path(resume_ckpt).expanduser())
        return None if layout is None else builtin_text_encoder_2_layers(layout) is not None
    return _hub_is_sdxl(resume_ckpt)


def _hub_is_sdxl(repo_id: str) -> bool | None:
    """From the cached ``model_index.json``, else the hub's once it answers; None offline
    (loading the model says why)."""
    try:
        return _names_second_encoder(DiffusionPipeline.load_config(repo_id, local_files_only=True))
    except (OSError, ValueError):
        pass
    if hub_constants.HF_HUB_OFFLINE:
        return None
    try:
        _check_hub(repo_id, f"resume_ckpt: '{repo_id}':")
        return _names_second_encoder(DiffusionPipeline.load_config(repo_id))
    except (UserError, OSError, ValueError):
        return None


def _is_sdxl_source(source: str, options: dict[str, bool]) -> bool:
    """Whether the folder or hub repo ``source`` is SDXL, by its ``model_index.json``."""
    if Path(source).is_dir():
        return folder_is_sdxl(Path(source))
    try:
        index = DiffusionPipeline.load_config(source, **options)
    except (OSError, ValueError):
        return False  # loading the components reports what is missing
    return _names_second_encoder(index)


def _from_pretrained(source: str, options: dict[str, bool]) -> ModelBundle:
    text_encoder_2 = tokenizer_2 = None
    if _is_sdxl_source(source, options):
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder=SECOND_ENCODER, dtype=LOAD_DTYPE, **options
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **options)
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
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def load_models(
    resume_ckpt: str, prediction_type: str | None = None, weights: bool = True
) -> ModelBundle:
    """Load (or build) the model named by ``resume_ckpt``; see the module docstring.

    The training noise scheduler is always a ``DDPMScheduler`` made from the source's scheduler
    configuration (betas, ``prediction_type``), whatever scheduler class the folder names.
    ``prediction_type`` ("epsilon" or "v_prediction"), when given, replaces the model's own.
    ``weights`` False: shapes without data where the source allows it (module docstring).
    """
    bundle = _load(resume_ckpt, weights)
    if prediction_type is not None:
        assert prediction_type in PREDICTION_TYPES, prediction_type
        if prediction_type != bundle.prediction_type:
            logger.info(
                "prediction_type %s replaces the model's own %s",
                prediction_type,
                bundle.prediction_type,
            )
        bundle.noise_scheduler = DDPMScheduler.from_config(
            bundle.noise_scheduler.config, prediction_type=prediction_type
        )
    return bundle


def _load(resume_ckpt: str, weights: bool) -> ModelBundle:
    kind = classify_resume_ckpt(resume_ckpt)
    if kind is SourceKind.BUILTIN:
        return build_builtin(resume_ckpt) if weights else _builtin_shapes(resume_ckpt)
    if kind is SourceKind.SINGLE_FILE:
        logger.info("loading single-file checkpoint %s", resume_ckpt)
        bundle = load_single_file(Path(resume_ckpt).expanduser(), weights)
        bundle.source = resume_ckpt
        return bundle
    if kind is SourceKind.LOCAL:
        folder = str(Path(resume_ckpt).expanduser())
        logger.info("loading diffusers model from folder %s", folder)
        try:
            bundle = _load_components(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise UserError(f"resume_ckpt: could not load '{resume_ckpt}': {error}") from error
        bundle.source = resume_ckpt
        return bundle
    return _load_from_hub(resume_ckpt)


def _builtin_shapes(name: str) -> ModelBundle:
    """A built-in model on the meta device; its noise schedule, made outside it, is real."""
    with torch.device("meta"):
        bundle = build_builtin(name)
    bundle.noise_scheduler = DDPMScheduler.from_config(bundle.noise_scheduler.config)
    return bundle


def _load_from_hub(repo_id: str) -> ModelBundle:
    """From the local Hugging Face cache, else downloaded once the hub answers quickly."""
    try:
        bundle = _load_components(repo_id, local_files_only=True)
    except (OSError, ValueError):
        pass
    else:
        logger.info("loaded %s from the local Hugging Face cache", repo_id)
        return bundle
    not_here = (
        f"resume_ckpt: '{repo_id}' is not a folder here ({Path(repo_id).absolute()}) nor in the "
        f"local Hugging Face cache ({hub_constants.HF_HUB_CACHE}), and"
    )
    if hub_constants.HF_HUB_OFFLINE:
        raise UserError(f"{not_here} HF_HUB_OFFLINE is set{_alternatives(repo_id)}")
    _check_hub(repo_id, not_here)
    logger.info("downloading diffusers model %s from the Hugging Face hub", repo_id)
    try:
        return _load_components(repo_id, local_files_only=False)
    except OSError as error:
        raise UserError(
            f"resume_ckpt: '{repo_id}' could not be downloaded from the Hugging Face hub "
            f"({_first_line(error)}){_alternatives(repo_id)}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_hub(repo_id: str, not_here: str) -> None:
    """One request with a short timeout: `UserError` when the hub or the repo cannot be had.

    Without it, an offline machine spends half a minute in retries before a misleading message.
    """
    api = huggingface_hub.HfApi(endpoint=hub_constants.ENDPOINT)
    try:
        api.model_info(repo_id, timeout=HUB_TIMEOUT)
    except HfHubHTTPError as error:  # the hub answered: no such repo, gated, private, ...
        raise UserError(
            f"{not_here} the Hugging Face hub says: {_first_line(error)}{_alternatives(repo_id)}"
        ) from error
    except Exception as error:  # any transport failure means "no network"
        raise UserError(
            f"{not_here} the Hugging Face hub ({hub_constants.ENDPOINT}) cannot be reached "
            f"({type(error).__name__}: {_first_line(error)}){_alternatives(repo_id)}"
        ) from error
