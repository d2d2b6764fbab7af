"""kohya's LoRA file format (``networks.lora``): key names, tensors, metadata and hashes.

This is the format AUTOMATIC1111, ComfyUI and Forge load from ``models/Lora``:

- keys ``<prefix>_<module path with "." replaced by "_">.<part>``, prefix ``lora_unet`` or
  ``lora_te``, part ``lora_down.weight`` (rank x in, or rank x in x k x k), ``lora_up.weight``
  (out x rank, 1x1 for convolutions) and ``alpha`` (a scalar tensor in the file's dtype); the
  scale at load time is alpha / rank;
- text-encoder paths are transformers 4's, under ``text_model`` (see `lora.adapters`);
- metadata: strings in the safetensors header (kohya writes every value with ``str()``), among
  them ``sshs_model_hash`` / ``sshs_legacy_hash``, the hashes sd-webui-additional-networks
  computes, worked out over the file as it would be with only the ``ss_`` metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lora.adapters import TEXT_ENCODER, TEXT_ENCODER_2, UNET, AdapterWeights
from lora.settings import LoraSettings
from models.bundle import TEXT_TIME
from models.ldm_layout import unet_key_to_ldm

PREFIXES = {UNET: "lora_unet", TEXT_ENCODER: "lora_te"}
SDXL_PREFIXES = {UNET: "lora_unet", TEXT_ENCODER: "lora_te1", TEXT_ENCODER_2: "lora_te2"}
ALL_PREFIXES = tuple(dict.fromkeys([*PREFIXES.values(), *SDXL_PREFIXES.values()]))
DOWN = "lora_down.weight"
UP = "lora_up.weight"
ALPHA = "alpha"
NETWORK_MODULE = "networks.lora"
# sd-webui-additional-networks' legacy hash: 64 KiB read from 1 MiB into the file.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_HEADER_LENGTH_BYTES = 8


@dataclass(frozen=True)
class KohyaNaming:
    """How kohya names a model's modules. SD1.x/2.x: ``lora_unet_`` and ``lora_te_`` with
    diffusers' and transformers' module paths. SDXL: ``lora_te1_`` / ``lora_te2_`` for the two
    encoders, and the UNet's modules by their LDM names
    (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as kohya's SDXL UNet has them and
    A1111, ComfyUI and diffusers read them; ``unet_config`` (the UNet's) gives those names."""

    sdxl: bool = False
    unet_config: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, unet: nn.Module) -> KohyaNaming:
        """The naming for the model ``unet`` belongs to (SDXL: ``text_time`` conditioning)."""
        config = dict(unet.config)
        sdxl = config.get("addition_embed_type") == TEXT_TIME
        return cls(sdxl, config if sdxl else None)

    def name(self, part: str, module: str) -> str:
        """``lora_unet_down_blocks_0_..._to_q`` for a module's name in files (`lora.adapters`)."""
        if not self.sdxl:
            return f"{PREFIXES[part]}_{module.replace('.', '_')}"
        if part == UNET:
            assert self.unet_config is not None, "SDXL's UNet names need the UNet's config"
            module = unet_key_to_ldm(f"{module}.weight", dict(self.unet_config))
            module = module.removesuffix(".weight")
        return f"{SDXL_PREFIXES[part]}_{module.replace('.', '_')}"


SD_NAMING = KohyaNaming()  # SD1.x/2.x's names


def kohya_tensors(
    weights: Mapping[str, Mapping[str, AdapterWeights]],
    dtype: torch.dtype,
    naming: KohyaNaming = SD_NAMING,
) -> dict[str, torch.Tensor]:
    """The file's tensors: ``weights`` (part -> module name -> adapter) as CPU ``dtype`` copies.

    A value that ``dtype`` cannot hold (beyond fp16's range) is an error naming the key.
    """
    tensors = {}
    for part, modules in weights.items():
        for module, adapter in modules.items():
            key = naming.name(part, module)
            tensors[f"{key}.{DOWN}"] = _converted(adapter.down, dtype, key)
            tensors[f"{key}.{UP}"] = _converted(adapter.up, dtype, key)
            tensors[f"{key}.{ALPHA}"] = torch.tensor(adapter.alpha, dtype=dtype)
    return tensors


def _converted(tensor: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    converted = tensor.detach().to("cpu", dtype, copy=True).contiguous()
    if not bool(torch.isfinite(converted).all()) and bool(torch.isfinite(tensor).all()):
        raise OverflowError(
            f"{key}: the adapter's weights exceed the range of {dtype}; set save_full_precision"
        )
    return converted


def read_kohya_tensors(
    tensors: Mapping[str, torch.Tensor], names: Mapping[str, tuple[str, str]]
) -> tuple[dict[str, dict[str, AdapterWeights]], list[str]]:
    """A kohya file's tensors as part -> module name -> adapter; the keys that do not fit.

    ``names`` maps each kohya module name this model could have to (part, module name). A
    module without ``alpha`` gets its rank (kohya's rule for old files). Returns the adapters
    and the keys that name no such module or are not one of the three parts.
    """
    found: dict[str, dict[str, AdapterWeights]] = {}
    unknown = []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, suffix = key.partition(".")
        if module not in names or suffix not in (DOWN, UP, ALPHA):
            unknown.append(key)
            continue
        groups.setdefault(module, {})[suffix] = tensor
    for module, parts in groups.items():
        if DOWN not in parts or UP not in parts:
            unknown += [f"{module}.{suffix}" for suffix in parts]
            continue
        rank = parts[DOWN].shape[0]
        alpha = float(parts[ALPHA].item()) if ALPHA in parts else float(rank)
        part, name = names[module]
        found.setdefault(part, {})[name] = AdapterWeights(parts[DOWN], parts[UP], alpha)
    return found, sorted(unknown)


@dataclass(frozen=True)
class KohyaInfo:
    """What kohya's metadata says about a run and its base model."""

    output_name: str  # the file's name without .safetensors
    training_started_at: float  # time.time() when the run started
    steps: int  # optimizer steps so far
    epoch: int  # epochs so far
    v2: bool  # an SD2.x model (OpenCLIP text encoder)
    v_prediction: bool
    sdxl: bool  # an SDXL model
    resolution: int  # training resolution in pixels
    base_model: str  # the base model's name (a built-in name, a folder or file name)


def base_model_version(v2: bool, v_prediction: bool, sdxl: bool = False) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1``, ``sd_v2``, with ``_v`` for v-prediction;
    ``sdxl_base_v1-0`` for SDXL."""
    if sdxl:
        return "sdxl_base_v1-0"
    return f"sd_{'v2' if v2 else 'v1'}{'_v' if v_prediction else ''}"


def _architecture(info: KohyaInfo) -> str:
    """ModelSpec's architecture of a LoRA for the base model, as kohya names it."""
    if info.sdxl:
        base = "stable-diffusion-xl-v1-base"
    elif not info.v2:
        base = "stable-diffusion-v1"
    else:
        base = "stable-diffusion-v2-768-v" if info.v_prediction else "stable-diffusion-v2-512"
    return f"{base}/lora"


def kohya_metadata(settings: LoraSettings, info: KohyaInfo, finished_at: float) -> dict[str, str]:
    """kohya's ``ss_`` metadata and ModelSpec's required keys (hashes not included)."""
    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_network_dropout": str(settings.dropout),
        "ss_v2": str(info.v2),
        "ss_base_model_version": base_model_version(info.v2, info.v_prediction, info.sdxl),
        "ss_sd_model_name": info.base_model,
        "ss_output_name": info.output_name,
        "ss_training_started_at": str(info.training_started_at),
        "ss_training_finished_at": str(finished_at),
        "ss_steps": str(info.steps),
        "ss_epoch": str(info.epoch),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _architecture(info),
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.prediction_type": "v" if info.v_prediction else "epsilon",
        "modelspec.date": datetime.fromtimestamp(finished_at, timezone.utc).date().isoformat(),
    }
    if settings.locon:
        arguments = {"conv_dim": str(settings.conv_rank), "conv_alpha": str(settings.conv_alpha)}
        metadata["ss_network_args"] = json.dumps(arguments)
    return metadata


def addnet_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` as kohya precomputes them.

    Both are taken over the file as it would be with only the ``ss_`` metadata: the model
    hash is the SHA-256 of everything after the header, the legacy hash the first 8 hex digits
    of the SHA-256 of the 64 KiB at 1 MiB.
    """
    training = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), training)
    header = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    model_hash = hashlib.sha256(data[_HEADER_LENGTH_BYTES + header :]).hexdigest()
    legacy = data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8],
    }
