"""The adapters peft put into a model: finding them, their weights, and their exact state.

Every adapter of this trainer is peft's adapter named ``default`` (`ADAPTER`). A module that
has one is a peft `LoraLayer` (its base layer is kept as ``base_layer``); its adapter is
``lora_A`` (kohya's ``lora_down``: rank x in, or rank x in x k x k for a convolution) and
``lora_B`` (kohya's ``lora_up``: out x rank, 1x1 for a convolution), scaled by alpha / rank.

Module names in files: the UNet's are diffusers' module paths; the text encoder's are the
standard transformers names under ``text_model.`` (transformers 5 builds ``CLIPTextModel``
without that level, transformers 4 with it; files always have it, as every Stable Diffusion
file does). `file_module_name` and `named_layers` apply this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from config.errors import UserError
from models.text_keys import TEXT_MODEL

ADAPTER = "default"
# The models that get adapters, as the bundle, diffusers' files and our names call them
# (``text_encoder_2``: SDXL's second encoder).
UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
TEXT_PARTS = (TEXT_ENCODER, TEXT_ENCODER_2)


@dataclass(frozen=True)
class AdapterWeights:
    """One module's adapter: ``down`` (peft's lora_A), ``up`` (lora_B) and its alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def file_module_name(part: str, name: str) -> str:
    """A module's name in LoRA files: text-encoder names always start with ``text_model.``."""
    if part in TEXT_PARTS and not name.startswith(TEXT_MODEL):
        return TEXT_MODEL + name
    return name


def adapted_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The modules of ``model`` that have an adapter, by their module path."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def has_adapters(model: nn.Module) -> bool:
    """Whether peft put adapters into ``model``."""
    return any(isinstance(module, LoraLayer) for module in model.modules())


def named_layers(part: str, model: nn.Module) -> dict[str, LoraLayer]:
    """`adapted_layers` by their names in files (see `file_module_name`)."""
    return {file_module_name(part, name): layer for name, layer in adapted_layers(model).items()}


def layer_weights(layer: LoraLayer) -> AdapterWeights:
    """The live adapter tensors of one layer (not copies) and its alpha."""
    return AdapterWeights(
        down=layer.lora_A[ADAPTER].weight,
        up=layer.lora_B[ADAPTER].weight,
        alpha=float(layer.lora_alpha[ADAPTER]),
    )


def module_weights(part: str, model: nn.Module) -> dict[str, AdapterWeights]:
    """Every adapter of ``model`` by its name in files, live tensors (not copies)."""
    return {name: layer_weights(layer) for name, layer in named_layers(part, model).items()}


def _is_adapter_parameter(name: str) -> bool:
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of ``model``, named as in ``model.named_parameters()``."""
    return {name: p for name, p in model.named_parameters() if _is_adapter_parameter(name)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the adapter parameters: what an exact resume needs of ``model``."""
    return {
        name: p.detach().to("cpu", torch.float32, copy=True)
        for name, p in adapter_parameters(model).items()
    }


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put a state of `adapter_state_dict` back into ``model``'s adapters (in place).

    The names and shapes must be the same: anything else is a `UserError` (the adapters were
    made with other settings: rank, targets, frozen layers).
    """
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(
            f"the saved LoRA adapters do not fit this run's: {len(missing)} missing, "
            f"{len(unexpected)} unexpected (first: {first}); the LoRA settings (lora_rank, "
            "lora_conv_rank, text encoder training and freezing) must be those of the saved run"
        )
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise UserError(
                f"the saved LoRA adapter {name} has shape {tuple(state[name].shape)}, this "
                f"run's {tuple(p.shape)}: lora_rank and lora_conv_rank must be the saved run's"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def count_tensors_and_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter tensors, adapter parameters) of ``model`` in memory (lora_A and lora_B)."""
    params = adapter_parameters(model)
    return len(params), sum(p.numel() for p in params.values())
