"""A single-file checkpoint → `ModelBundle`, with no network.

The architecture is found from the tensors alone: the file's keys and shapes are compared with the
LDM layout of each built-in configuration (`models.builtin`: the real SD1.5, SD2.1 and SDXL 1.0
base shapes at full size, and the tiny models). The matching configuration builds the models, and
diffusers' ``single_file_utils`` converts the weights (its conversion functions only rename
tensors; they are given the configuration, so nothing is fetched). A file that matches no known
layout is an error that says what was found and how it differs from the closest layout.

Prediction type: ``model.params.parameterization`` of a ``.yaml`` beside the file (as AUTOMATIC1111
reads it) when there is one; otherwise SD1.x layouts are epsilon and SD2.x layouts (OpenCLIP
text encoder) v-prediction, as SD2.0-v, SD2.1 and most SD2.x fine-tunes are (the 512 px SD2 base
models are epsilon: put their ``.yaml`` beside them or set ``prediction_type``). SDXL layouts are
epsilon unless the file holds a ``v_pred`` key (as ComfyUI reads it; ``ztsnr`` beside it means a
zero-terminal-SNR schedule).

Tokenizer: a single file has none. The matching configuration's tokenizer is used: 49,408 entries
→ the real CLIP tokenizer of ``models/clip_tokenizer/`` (SD2.x's and SDXL's second pad with
``!``), the tiny built-ins' 1,152 → ``models/tokenizer/``.
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from config.errors import UserError
from models.builtin import BUILTIN_CONFIGS, builtin_tokenizer, builtin_tokenizer_2
from models.bundle import SD2, SDXL, ModelBundle, model_family
from models.ldm_config import EPSILON, V_PREDICTION, read_prediction_type
from models.ldm_layout import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ldm_state_dict,
)
from models.single_file import (
    SAFETENSORS,
    V_PRED_MARKER,
    ZTSNR_MARKER,
    read_single_file,
    yaml_beside,
)
from models.text_keys import TEXT_MODEL

logger = logging.getLogger(__name__)

# Keys real files hold that the diffusers models do not use (OpenCLIP's 24th layer, which SD2.x
# never runs; projections and scales of the pooled output; position ids of old transformers;
# EMA copies and the VAE's training loss).
_IGNORED = re.compile(
    r"cond_stage_model\.model\.(text_projection|logit_scale|transformer\.resblocks\.23\..*)"
    r"|(cond_stage_model|conditioner\.embedders\.0)\.transformer\.(text_model\.)?embeddings"
    r"\.position_ids"
    r"|conditioner\.embedders\.1\.model\.logit_scale"
    r"|first_stage_model\.loss\..*"
)
_WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")
_DESCRIPTIONS = {
    "sd15-random": "SD1.x",
    "sd21-random": "SD2.x",
    "tiny-sd15": "tiny-sd15",
    "tiny-sd21": "tiny-sd21",
    "tiny-sdxl": "tiny-sdxl",
    "sdxl-random": "SDXL",
}
# Text encoders by key prefix: (what, prefix, token embedding key, layer key pattern).
_TEXT_ENCODERS = (
    ("CLIP", CLIP_PREFIX, "text_model.embeddings.token_embedding.weight", "text_model"),
    ("OpenCLIP", OPEN_CLIP_PREFIX, "token_embedding.weight", "transformer"),
    ("SDXL CLIP", SDXL_CLIP_PREFIX, "text_model.embeddings.token_embedding.weight", "text_model"),
    ("SDXL OpenCLIP", SDXL_OPEN_CLIP_PREFIX, "token_embedding.weight", "transformer"),
)
_LAYER_PATTERNS = {
    "text_model": r"text_model\.encoder\.layers\.(\d+)\.",
    "transformer": r"transformer\.resblocks\.(\d+)\.",
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


@dataclass
class EmptyModels:
    """The models of a configuration, with parameters on the meta device."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection | None


def _empty_models(config: dict[str, Any]) -> EmptyModels:
    """UNet, VAE and text encoder(s) of ``config`` with parameters on the meta device."""
    text_2 = config.get("text_encoder_2")
    with accelerate.init_empty_weights():
        return EmptyModels(
            unet=UNet2DConditionModel.from_config(config["unet"]),
            vae=AutoencoderKL.from_config(config["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
            text_encoder_2=None
            if text_2 is None
            else CLIPTextModelWithProjection(CLIPTextConfig(**text_2)),
        )


@functools.cache
def expected_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of built-in configuration ``name`` in the LDM layout (nothing allocated)."""
    m = _empty_models(BUILTIN_CONFIGS[name])
    state = ldm_state_dict(m.unet, m.vae, m.text_encoder, text_encoder_2=m.text_encoder_2)
    return {k: tuple(v.shape) for k, v in state.items()}


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
    """The built-in configuration whose layout ``shapes`` has; `UserError` when none.

    Layouts are compared in turn until one matches: each comparison builds that configuration's
    models on the meta device once per process (0.1–0.5 s).
    """
    mismatches = []
    for name in BUILTIN_CONFIGS:
        mismatches.append(compare(name, shapes))
        if mismatches[-1].count == 0:
            return name
    closest = min(mismatches, key=lambda m: m.count)
    raise UserError(
        f"resume_ckpt: {path} is not a Stable Diffusion 1.x/2.x/XL single file this trainer "
        f"knows. Found: {describe(shapes)}. Closest known layout: {_DESCRIPTIONS[closest.name]} "
        f"({_differences(closest)}). Known layouts: SD1.x (CLIP ViT-L/14 text encoder, "
        f"cond_stage_model.transformer.*), SD2.x (OpenCLIP ViT-H/14, cond_stage_model.model.*), "
        f"SDXL 1.0 base (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, conditioner.embedders.0."
        f"transformer.* and conditioner.embedders.1.model.*), all with a 4-channel UNet "
        f"(model.diffusion_model.*) and VAE (first_stage_model.*)"
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
    for what, prefix, embedding, layer_kind in _TEXT_ENCODERS:
        table = shapes.get(prefix + embedding)
        if table is not None and len(table) == 2:
            layers = _count(shapes, re.escape(prefix) + _LAYER_PATTERNS[layer_kind])
            parts.append(
                f"{what} text encoder ({layers} layers, width {table[1]}, {table[0]} tokens)"
            )
    vae = [k for k in shapes if k.startswith(VAE_PREFIX)]
    if vae:
        parts.append(f"VAE ({len(vae)} tensors)")
    others = sorted({k.split(".")[0] for k in shapes if not k.startswith(_WEIGHT_PREFIXES)})
    if others:
        parts.append("other keys under " + ", ".join(f"{o}.*" for o in others[:6]))
    return "; ".join(parts) if parts else "no Stable Diffusion weights"


def single_file_layout(path: Path) -> str | None:
    """The built-in configuration whose layout a ``.safetensors`` file has, from its header only.

    None for ``.ckpt`` files (reading one means loading it) and for unknown layouts (loading
    reports those).
    """
    if Path(path).suffix.lower() != SAFETENSORS:
        return None
    shapes = file_shapes(path)
    for name in BUILTIN_CONFIGS:
        if compare(name, shapes).count == 0:
            return name
    return None


def single_file_text_encoder_layers(path: Path) -> int | None:
    """The (first) text encoder's layer count of a ``.safetensors`` single file, from its header.

    None where `single_file_layout` is None.
    """
    name = single_file_layout(path)
    if name is None:
        return None
    return int(BUILTIN_CONFIGS[name]["text_encoder"]["num_hidden_layers"])


def prediction_type_of(path: Path, family: str, keys: Iterable[str]) -> str:
    """From the ``.yaml`` beside the file, else the rule: SD2.x v-prediction, SD1.x epsilon,
    SDXL v-prediction with a ``v_pred`` key, else epsilon."""
    yaml_file = yaml_beside(path)
    if yaml_file.is_file():
        prediction = read_prediction_type(yaml_file)
        logger.info("prediction type %s, from %s", prediction, yaml_file)
        return prediction
    if family == SDXL:
        marked = V_PRED_MARKER in keys
        prediction = V_PREDICTION if marked else EPSILON
        rule = f"SDXL single files {'with' if marked else 'without'} a {V_PRED_MARKER} key"
    else:
        prediction = V_PREDICTION if family == SD2 else EPSILON
        rule = f"{'SD2.x' if family == SD2 else 'SD1.x'} single files without a .yaml beside them"
    logger.info(
        "prediction type %s: the default for %s (set prediction_type in train.json to override)",
        prediction,
        rule,
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
    text_encoder: CLIPTextModel, checkpoint: dict[str, torch.Tensor], open_clip_prefix: str | None
) -> dict[str, torch.Tensor]:
    """The text encoder's weights in the keys of this transformers version's model.

    ``open_clip_prefix``: where an OpenCLIP encoder's weights are; None for a CLIP one.
    """
    if open_clip_prefix is not None:
        weights = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=open_clip_prefix)
    else:
        weights = convert_ldm_clip_checkpoint(checkpoint)
    own = set(text_encoder.state_dict())
    if not hasattr(text_encoder, "text_model"):  # transformers 5: no text_model wrapper
        weights = {k.removeprefix(TEXT_MODEL): v for k, v in weights.items()}
    # Entries CLIPTextModel has no place for: the pooled-output projection, old position ids.
    return {k: v for k, v in weights.items() if k in own or not _unused_text_key(k)}


def _unused_text_key(key: str) -> bool:
    return key.startswith("text_projection") or key.endswith("position_ids")


def _family(config: dict[str, Any]) -> str:
    return model_family(config["text_encoder"]["hidden_act"], "text_encoder_2" in config)


def _noise_scheduler(config: dict[str, Any], prediction: str, keys: Iterable[str]) -> Any:
    """The configuration's DDPM schedule with ``prediction``; zero terminal SNR if ``ztsnr``."""
    overrides: dict[str, Any] = {"prediction_type": prediction}
    if ZTSNR_MARKER in keys and prediction == V_PREDICTION:
        logger.info("the file holds a %s key: zero-terminal-SNR noise schedule", ZTSNR_MARKER)
        overrides["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(config["scheduler"], **overrides)


def load_single_file(path: Path, weights: bool = True) -> ModelBundle:
    """The model in single file ``path`` (``.safetensors`` or ``.ckpt``), in float32; without
    ``weights``, on the meta device (`read_single_file`)."""
    path = Path(path)
    checkpoint = read_single_file(path, weights)
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    name = match_layout(path, shapes)
    config = BUILTIN_CONFIGS[name]
    family = _family(config)
    logger.info("%s has the %s layout", path, _DESCRIPTIONS[name])
    if any(k.startswith("model_ema.") for k in checkpoint):
        logger.info("%s also holds EMA weights; training starts from the non-EMA ones", path)
    prediction = prediction_type_of(path, family, checkpoint)
    unet_config = dict(config["unet"])
    if not name.startswith("tiny-") and family == SD2:
        unet_config["sample_size"] = _SD2_SAMPLE_SIZE[prediction]
    m = _empty_models({**config, "unet": unet_config})
    _load_into(m.unet, convert_ldm_unet_checkpoint(checkpoint, unet_config), path)
    _load_into(m.vae, convert_ldm_vae_checkpoint(checkpoint, config["vae"]), path)
    open_clip_prefix = OPEN_CLIP_PREFIX if family == SD2 else None
    _load_into(m.text_encoder, _text_weights(m.text_encoder, checkpoint, open_clip_prefix), path)
    if m.text_encoder_2 is not None:
        weights_2 = _text_weights(m.text_encoder_2, checkpoint, SDXL_OPEN_CLIP_PREFIX)
        _load_into(m.text_encoder_2, weights_2, path)
    noise_scheduler = _noise_scheduler(config, prediction, checkpoint)
    del checkpoint
    return ModelBundle(
        unet=m.unet,
        text_encoder=m.text_encoder,
        tokenizer=builtin_tokenizer(name),
        vae=m.vae,
        noise_scheduler=noise_scheduler,
        source=str(path),
        text_encoder_2=m.text_encoder_2,
        tokenizer_2=builtin_tokenizer_2(name),
    )
