"""Writing LoRA files, each read back and checked before it takes its place.

- `write_kohya_file`: the single ``.safetensors`` in kohya's format (`lora.kohya`), for
  AUTOMATIC1111, ComfyUI, Forge and kohya's scripts;
- `write_diffusers_file`: ``pytorch_lora_weights.safetensors`` in a folder, written by
  diffusers' own ``StableDiffusionPipeline.save_lora_weights`` with peft's key names and the
  adapters' ``LoraConfig`` as ``lora_adapter_metadata``, so ``pipe.load_lora_weights(folder)``
  gives each module its rank and alpha.

Both are fp16 unless full precision (fp32), written to a hidden temporary file, read back and
compared with what the adapters in memory hold (every tensor bit for bit in the file's dtype,
and the metadata), then renamed into place (`storage.atomic`). A difference is a
`LoraFileMismatchError` naming the file and the first differing key; the older file, if any, stays.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import SafetensorError, safe_open
from torch import nn

from lora.adapters import ADAPTER, AdapterWeights, module_weights
from lora.kohya import (
    SD_NAMING,
    KohyaInfo,
    KohyaNaming,
    addnet_hashes,
    kohya_metadata,
    kohya_tensors,
)
from lora.settings import LoraSettings
from storage.atomic import atomic_file, write_error

WHAT = "LoRA file"
# diffusers' file name in a folder (diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE).
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
# The safetensors metadata key diffusers keeps each model's LoraConfig under.
DIFFUSERS_METADATA = "lora_adapter_metadata"
LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"

Weights = dict[str, dict[str, AdapterWeights]]


class LoraFileMismatchError(RuntimeError):
    """A LoRA file read back is not what the adapters in memory hold."""


def live_weights(models: Mapping[str, nn.Module | None]) -> Weights:
    """The adapters of each model that has some: part -> module name -> live tensors."""
    weights = {}
    for part, model in models.items():
        found = {} if model is None else module_weights(part, model)
        if found:
            weights[part] = found
    assert weights, "no model has LoRA adapters"
    return weights


def file_dtype(full_precision: bool) -> torch.dtype:
    return torch.float32 if full_precision else torch.float16


def _write_checked(path: Path, write: Callable[[Path], None]) -> Path:
    try:
        return atomic_file(path, write, WHAT)
    except SafetensorError as error:
        raise write_error(path, error, WHAT) from error


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def compare_tensors(
    shown: Path, read: Mapping[str, torch.Tensor], meant: Mapping[str, torch.Tensor]
) -> None:
    """Raise `LoraFileMismatchError` at the first key that is missing, extra or different."""
    for key in sorted(set(read) | set(meant)):
        if key not in read:
            raise LoraFileMismatchError(f"{shown}: read back, it lacks {key}")
        if key not in meant:
            raise LoraFileMismatchError(f"{shown}: read back, it holds an extra {key}")
        if not _same(read[key], meant[key]):
            raise LoraFileMismatchError(
                f"{shown}: read back, {key} differs from the adapter weights in memory"
            )


def read_metadata(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as handle:
        return dict(handle.metadata() or {})


# --- kohya -----------------------------------------------------------------------------------


def write_kohya_file(
    path: Path,
    models: Mapping[str, nn.Module | None],
    settings: LoraSettings,
    info: KohyaInfo,
    full_precision: bool,
    naming: KohyaNaming = SD_NAMING,
) -> Path:
    """Write the adapters of ``models`` (``{"unet": ..., "text_encoder": ...}``, SDXL's
    ``text_encoder_2`` too) to ``path``, named by ``naming`` (SDXL's names for SDXL).

    See the module's docstring; returns ``path``.
    """
    path = Path(path)
    dtype = file_dtype(full_precision)
    weights = live_weights(models)
    tensors = kohya_tensors(weights, dtype, naming)
    metadata = kohya_metadata(settings, info, time.time())
    metadata.update(addnet_hashes(tensors, metadata))

    def write(temp: Path) -> None:
        safetensors.torch.save_file(tensors, str(temp), metadata=metadata)
        written = safetensors.torch.load_file(str(temp))
        compare_tensors(path, written, kohya_tensors(weights, dtype, naming))
        if read_metadata(temp) != metadata:
            raise LoraFileMismatchError(f"{path}: read back, its metadata differs")

    return _write_checked(path, write)


# --- diffusers -------------------------------------------------------------------------------


def diffusers_layers(weights: Weights, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """part -> peft's keys (``<module>.lora_A.weight``) -> CPU copies in ``dtype``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for part, modules in weights.items():
        layers[part] = {}
        for module, adapter in modules.items():
            layers[part][f"{module}.{LORA_A}"] = adapter.down.detach().to("cpu", dtype, copy=True)
            layers[part][f"{module}.{LORA_B}"] = adapter.up.detach().to("cpu", dtype, copy=True)
    return layers


def _canonical(value: Any) -> Any:
    """JSON-like data with sets and lists of strings sorted, for comparing metadata."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, list, tuple)):
        items = [_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def adapter_configs(
    models: Mapping[str, nn.Module | None], parts: list[str]
) -> dict[str, dict[str, Any]]:
    """Each part's peft ``LoraConfig`` as a dict (what diffusers stores in the file)."""
    return {part: models[part].peft_config[ADAPTER].to_dict() for part in parts}  # type: ignore[union-attr]


def write_diffusers_file(
    folder: Path, models: Mapping[str, nn.Module | None], full_precision: bool
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors``; returns its path (module docstring)."""
    path = Path(folder) / DIFFUSERS_WEIGHTS
    dtype = file_dtype(full_precision)
    weights = live_weights(models)
    layers = diffusers_layers(weights, dtype)
    configs = adapter_configs(models, list(layers))

    def write(temp: Path) -> None:
        kwargs: dict[str, Any] = {}
        pipeline: Any = StableDiffusionPipeline
        if "text_encoder_2" in layers:  # SDXL's: the same keys, and the second encoder's
            pipeline = StableDiffusionXLPipeline
            kwargs = {
                "text_encoder_2_lora_layers": layers["text_encoder_2"],
                "text_encoder_2_lora_adapter_metadata": configs["text_encoder_2"],
            }
        pipeline.save_lora_weights(
            temp.parent,
            unet_lora_layers=layers.get("unet"),
            text_encoder_lora_layers=layers.get("text_encoder"),
            weight_name=temp.name,
            unet_lora_adapter_metadata=configs.get("unet"),
            text_encoder_lora_adapter_metadata=configs.get("text_encoder"),
            **kwargs,
        )
        _verify_diffusers_file(temp, path, weights, configs, dtype)

    return _write_checked(path, write)


def _verify_diffusers_file(
    temp: Path,
    shown: Path,
    weights: Weights,
    configs: dict[str, dict[str, Any]],
    dtype: torch.dtype,
) -> None:
    meant = {
        f"{part}.{key}": tensor
        for part, tensors in diffusers_layers(weights, dtype).items()
        for key, tensor in tensors.items()
    }
    compare_tensors(shown, safetensors.torch.load_file(str(temp)), meant)
    written = json.loads(read_metadata(temp).get(DIFFUSERS_METADATA, "{}"))
    expected = {f"{part}.{k}": v for part, config in configs.items() for k, v in config.items()}
    if _canonical(written) != _canonical(json.loads(json.dumps(_canonical(expected)))):
        raise LoraFileMismatchError(f"{shown}: read back, its {DIFFUSERS_METADATA} differs")
