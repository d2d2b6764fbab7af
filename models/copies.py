"""Copies of a model that cost no memory: built on the meta device, then given tensors.

diffusers models are rebuilt with ``from_config``, transformers models with their config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


def empty_copy(model: nn.Module) -> nn.Module:
    """A model of the same class and configuration, its parameters on the meta device."""
    with torch.device("meta"):
        if hasattr(model.config, "to_dict"):  # transformers
            return type(model)(copy.deepcopy(model.config))
        return type(model).from_config(model.config)  # diffusers


def sharing_copy(model: nn.Module, replacements: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model like ``model`` whose tensors are ``model``'s own (shared, not copied), except
    those named in ``replacements`` (``state_dict`` names), which take those tensors. In eval
    mode, without gradients."""
    clone = empty_copy(model)
    tensors = {name: replacements.get(name, tensor) for name, tensor in model.state_dict().items()}
    clone.load_state_dict(tensors, strict=True, assign=True)
    saved = set(tensors)
    for name, buffer in model.named_buffers():  # the non-persistent ones are not in state_dict
        if name not in saved:
            owner, _, leaf = name.rpartition(".")
            clone.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
    return clone.requires_grad_(False).eval()
