"""The base model with its adapters merged in (``lora_merge``), leaving the live model as it is.

Each adapted weight becomes ``W + alpha / rank * up @ down`` (for a convolution, peft composes
the 3x3 ``down`` and the 1x1 ``up`` into one 3x3 kernel), computed by peft's own
``get_delta_weight`` in fp32, one tensor at a time. The result is an ordinary model without
adapters, on the CPU, that the checkpoint writers take like any other.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from lora.adapters import ADAPTER, adapted_layers, has_adapters
from models.bundle import ModelBundle

BASE_LAYER = ".base_layer"


def merged_state_dict(
    model: nn.Module, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``model``'s weights with every adapter merged, under a plain model's keys, on the CPU.

    Floating-point tensors are returned in ``dtype``; ``model`` is not changed.
    """
    layers = adapted_layers(model)
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if ".lora_" in key:
            continue
        if module.endswith(BASE_LAYER):
            owner = module.removesuffix(BASE_LAYER)
            key = f"{owner}.{leaf}"
            if leaf == "weight" and owner in layers:
                with torch.no_grad():
                    delta = layers[owner].get_delta_weight(ADAPTER)
                    tensor = tensor.to(torch.float32) + delta.to(torch.float32)
        wanted = dtype if tensor.is_floating_point() else tensor.dtype
        merged[key] = tensor.detach().to("cpu", wanted)
    return merged


def merged_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A new model of ``model``'s class and configuration holding `merged_state_dict`.

    Built on the meta device and given the merged CPU tensors, so no other copy is made.
    """
    with torch.device("meta"):
        if hasattr(model.config, "to_dict") and not hasattr(model, "from_config"):  # transformers
            plain = type(model)(copy.deepcopy(model.config))
        else:  # diffusers
            plain = type(model).from_config(model.config)
    plain.load_state_dict(merged_state_dict(model, dtype), strict=True, assign=True)
    _copy_unsaved_buffers(plain, model)
    return plain.eval()


def _copy_unsaved_buffers(plain: nn.Module, model: nn.Module) -> None:
    """Buffers a state dict leaves out (CLIP's ``position_ids``), copied to the CPU."""
    source = dict(model.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            value = source[name].detach().to("cpu", copy=True)
            plain.get_submodule(owner).register_buffer(leaf, value, persistent=False)


def merged_bundle(bundle: ModelBundle, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """The bundle with its adapted models replaced by merged copies (others shared as they are)."""
    changes = {
        name: merged_model(model, dtype)
        for name, model in bundle.named_models().items()
        if has_adapters(model)
    }
    return dataclasses.replace(bundle, **changes)
