"""Copies of a model that cost no memory: built on the meta device, then given tensors.

diffusers models are rebuilt with ``from_config``, transformers models with their config.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

# Emptied copies kept for the next `converted_copy` of a model of the same class, configuration
# and tensor names: building one costs more than a small model's checkpoint write (a tenth of
# a second for the tiny models, more for full-size ones), and every checkpoint needs them.
_SPARES: dict[tuple[Any, ...], nn.Module] = {}
_MAX_SPARES = 8


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


@contextlib.contextmanager
def converted_copy(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """A CPU copy of ``model`` in eval mode whose floating-point tensors are ``dtype``, for
    the ``with`` block; ``model`` is left as it is.

    The copy takes CPU tensors converted one by one (no second full-precision copy, no device
    memory). When the block ends its tensors are released, and its empty modules are kept for
    the next copy of a model like this one.
    """
    weights = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
        for name, tensor in model.state_dict().items()
    }
    key = (type(model), _configuration(model), tuple(weights))
    clone = _SPARES.pop(key, None)
    if clone is None:
        clone = empty_copy(model)
    clone.load_state_dict(weights, strict=True, assign=True)
    del weights
    try:
        yield clone.eval()
    finally:
        clone.to_empty(device="meta")
        _SPARES[key] = clone
        while len(_SPARES) > _MAX_SPARES:
            del _SPARES[next(iter(_SPARES))]


def _configuration(model: nn.Module) -> str:
    """The whole configuration of a diffusers or transformers model, as text."""
    config = model.config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(values, sort_keys=True, default=repr)
