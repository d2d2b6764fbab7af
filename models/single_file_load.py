"""A single-file checkpoint → `ModelBundle`, with no network.

The architecture is found from the tensors alone: the file's keys and shapes are compared with the
LDM layout of each built-in configuration (`models.builtin`: the real SD1.5 and SD2.1 shapes at
full size, and the tiny models). The matching configuration builds the models, and diffusers'
``single_file_utils`` converts the weights (its conversion functions only rename tensors; they
are given the configuration, so nothing is fetched). A file that matches no known layout is an
error that says what was found and how it differs from the closest layout.

Prediction type: ``model.params.parameterization`` of a ``.yaml`` beside the file (as AUTOMATIC1111
reads it) when there is one; otherwise SD1.x layouts are epsilon and SD2.x layouts (OpenCLIP
text encoder) v-prediction, as SD2.0-v, SD2.1 and most SD2.x fine-tunes are (the 512 px SD2 base
models are epsilon: put their ``.yaml`` beside them or set ``prediction_type``).

Tokenizer: a single file has none. The embedding table's size picks it: 49,408 entries → the real
CLIP tokenizer of ``models/clip_tokenizer/`` (SD2.x's pads with ``!``), the tiny built-ins'
1,152 → ``models/tokenizer/``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from config.errors import UserError
from models.builtin import BUILTIN_CONFIGS, builtin_tokenizer
from models.bundle import ModelBundle
from models.ldm_config import EPSILON, V_PREDICTION, read_prediction_type
from models.ldm_layout import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ldm_state_dict,
)
from models.single_file import SAFETENSORS, read_single_file, yaml_beside
from models.text_keys import TEXT_MODEL

logger = logging.getLogger(__name__)

# Keys real files hold that the diffusers models do not use (OpenCLIP's 24th layer, which SD2.x
# never runs; projections and scales of the pooled output; position ids of old transformers;
# EMA copies and the VAE's training loss).
_IGNORED = re.compile(
    r"cond_stage_model\.model\.(text_projection|logit_scale|transformer\.resblocks\.23\..*)"
    r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids"
    r"|first_stage_model\.loss\..*"
)
_WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")
_DESCRIPTIONS = {
    "sd15-random": "SD1.x",
    "sd21-random": "SD2.x",
    "tiny-sd15": "tiny-sd15",
    "tiny-sd21": "tiny-sd21",
}
_SD2_SAMPLE_SIZE = {V_PREDICTION: 96, EPSILON: 64}  # 768 px v models, 512 px base models


@dataclass(frozen=True)
class Mismatch:
    """How a file differs from one known layout."""

    name: str
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)


def _empty_models(config: dict[str, Any]) -> tuple[Any, Any, CLIPTextModel]:
    """UNet, VAE and text encoder of ``config`` with parameters on the meta device."""
    with accelerate.init_empty_weights():
        return (
            UNet2DConditionModel.from_config(config["unet"]),
            AutoencoderKL.from_config(config["vae"]),
            CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        )


@functools.cache
def expected_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of built-in configuration ``name`` in the LDM layout (nothing allocated)."""
    unet, vae, text = _empty_models(BUILTIN_CONFIGS[name])
    return {k: tuple(v.shape) for k, v in ldm_state_dict(unet, vae, text).items()}


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor in a ``.safetensors`` file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise UserError(f"resume_ckpt: {path} cannot be read as safetensors: {error}") from error


def compare(name: str, shapes: dict[str, tuple[int, ...]]) -> Mismatch:
    """How ``shapes`` (a file's) differ from built-in layout ``name``."""
    expected = expected_shapes(name)
    weights = [k for k in shapes if k.startswith(_WEIGHT_PREFIXES) and not _IGNORED.fullmatch(k)]
    return Mismatch(
        name=name,
        missing=[k for k in expected if k not in shapes],
        unexpected=[k for k in weights if k not in expected],
        wrong_shape=[
            f"{k} is {list(shapes[k])}, expected {list(v)}"
            for k, v in expected.items()
            if k in shapes and shapes[k] != v
        ],
    )


def match_layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """The built-in configuration whose layout ``shapes`` has; `UserError` when none."""
    mismatches = [compare(name, shapes) for name in BUILTIN_CONFIGS]
    for mismatch in mismatches:
        if mismatch.count == 0:
            return mismatch.name
    closest = min(mismatches, key=lambda m: m.count)
    raise UserError(
        f"resume_ckpt: {path} is not a Stable Diffusion 1.x/2.x single file this trainer knows. "
        f"Found: {describe(shapes)}. Closest known layout: {_DESCRIPTIONS[closest.name]} "
        f"({_differences(closest)}). Known layouts: SD1.x (CLIP ViT-L/14 text encoder, "
        f"cond_stage_model.transformer.*), SD2.x (OpenCLIP ViT-H/14, cond_stage_model.model.*), "
        f"both with a 4-channel UNet (model.diffusion_model.*) and VAE (first_stage_model.*)"
    )


def _examples(items: list[str], what: str) -> str:
    if not items:
        return ""
    more = f" and {len(items) - 2} more" if len(items) > 2 else ""
    return f"{len(items)} {what} ({'; '.join(items[:2])}{more})"


def _differences(mismatch: Mismatch) -> str:
    parts = [
        _examples(mismatch.missing, "missing"),
        _examples(mismatch.unexpected, "unexpected"),
        _examples(mismatch.wrong_shape, "of another shape"),
    ]
    return ", ".join(part for part in parts if part)


def _count(shapes: Iterable[str], pattern: str) -> int:
    found = {m.group(1) for k in shapes if (m := re.match(pattern, k)) is not None}
    return len(found)


def describe(shapes: dict[str, tuple[int, ...]]) -> str:
    """What a file holds, in a few words: UNet, text encoder, VAE and other key groups."""
    parts = []
    unet = [k for k in shapes if k.startswith(UNET_PREFIX)]
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet and conv_in is not None and len(conv_in) == 4:
        parts.append(
            f"UNet ({len(unet)} tensors, {conv_in[1]} input channels, {conv_in[0]} channels)"
        )
    elif unet:
        parts.append(f"UNet ({len(unet)} tensors)")
    clip = shapes.get(CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
    open_clip = shapes.get(OPEN_CLIP_PREFIX + "token_embedding.weight")
    if clip is not None:
        layers = _count(shapes, re.escape(CLIP_PREFIX) + r"text_model\.encoder\.layers\.(\d+)\.")
        parts.append(f"CLIP text encoder ({layers} layers, width {clip[1]}, {clip[0]} tokens)")
    elif open_clip is not None:
        layers = _count(shapes, re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
        parts.append(
            f"OpenCLIP text encoder ({layers} layers, width {open_clip[1]}, {open_clip[0]} tokens)"
        )
    vae = [k for k in shapes if k.startswith(VAE_PREFIX)]
    if vae:
        parts.append(f"VAE ({len(vae)} tensors)")
    others = sorted({k.split(".")[0] for k in shapes if not k.startswith(_WEIGHT_PREFIXES)})
    if others:
        parts.append("other keys under " + ", ".join(f"{o}.*" for o in others[:6]))
    return "; ".join(parts) if parts else "no Stable Diffusion weights"


def single_file_text_encoder_layers(path: Path) -> int | None:
    """The text encoder's layer count of a ``.safetensors`` single file, from its header only.

    None for ``.ckpt`` files (reading one means loading it) and for unknown layouts (loading
    reports those).
    """
    if Path(path).suffix.lower() != SAFETENSORS:
        return None
    shapes = file_shapes(path)
    for name in BUILTIN_CONFIGS:
        if compare(name, shapes).count == 0:
            return int(BUILTIN_CONFIGS[name]["text_encoder"]["num_hidden_layers"])
    return None


def prediction_type_of(path: Path, open_clip: bool) -> str:
    """From the ``.yaml`` beside the file, else the rule: SD2.x v-prediction, SD1.x epsilon."""
    yaml_file = yaml_beside(path)
    if yaml_file.is_file():
        prediction = read_prediction_type(yaml_file)
        logger.info("prediction type %s, from %s", prediction, yaml_file)
        return prediction
    prediction = V_PREDICTION if open_clip else EPSILON
    logger.info(
        "prediction type %s: the default for %s single files without a .yaml beside them (set "
        "prediction_type in train.json to override)",
        prediction,
        "SD2.x" if open_clip else "SD1.x",
    )
    return prediction


def _float32(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}


def _load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Assign converted weights to a model built with empty (meta) parameters."""
    try:
        model.load_state_dict(_float32(weights), strict=True, assign=True)
    except RuntimeError as error:
        raise UserError(f"resume_ckpt: the weights of {path} do not fit: {error}") from error
    model.eval()


def _text_weights(
    text_encoder: CLIPTextModel, checkpoint: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The text encoder's weights in the keys of this transformers version's ``CLIPTextModel``."""
    if OPEN_CLIP_PREFIX + "token_embedding.weight" in checkpoint:
        weights = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=OPEN_CLIP_PREFIX)
    else:
        weights = convert_ldm_clip_checkpoint(checkpoint)
    own = set(text_encoder.state_dict())
    if not hasattr(text_encoder, "text_model"):  # transformers 5: no text_model wrapper
        weights = {k.removeprefix(TEXT_MODEL): v for k, v in weights.items()}
    # Entries CLIPTextModel has no place for: the pooled-output projection, old position ids.
    return {k: v for k, v in weights.items() if k in own or not _unused_text_key(k)}


def _unused_text_key(key: str) -> bool:
    return key.startswith("text_projection") or key.endswith("position_ids")


def load_single_file(path: Path) -> ModelBundle:
    """The model in single file ``path`` (``.safetensors`` or ``.ckpt``), in float32."""
    path = Path(path)
    checkpoint = read_single_file(path)
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    name = match_layout(path, shapes)
    config = BUILTIN_CONFIGS[name]
    open_clip = OPEN_CLIP_PREFIX + "token_embedding.weight" in checkpoint
    logger.info("%s has the %s layout", path, _DESCRIPTIONS[name])
    if any(k.startswith("model_ema.") for k in checkpoint):
        logger.info("%s also holds EMA weights; training starts from the non-EMA ones", path)
    prediction = prediction_type_of(path, open_clip)
    unet_config = dict(config["unet"])
    if not name.startswith("tiny-") and open_clip:
        unet_config["sample_size"] = _SD2_SAMPLE_SIZE[prediction]
    unet, vae, text_encoder = _empty_models({**config, "unet": unet_config})
    _load_into(unet, convert_ldm_unet_checkpoint(checkpoint, unet_config), path)
    _load_into(vae, convert_ldm_vae_checkpoint(checkpoint, config["vae"]), path)
    _load_into(text_encoder, _text_weights(text_encoder, checkpoint), path)
    del checkpoint
    return ModelBundle(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=builtin_tokenizer(name),
        vae=vae,
        noise_scheduler=DDPMScheduler.from_config(config["scheduler"], prediction_type=prediction),
        source=str(path),
    )
