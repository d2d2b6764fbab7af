"""How big the adapters are: tensors and parameters per model, and the kohya file's size.

`lora_report` measures the adapters a run has; `planned_report` works out the same from the
targets alone (no adapters made, so models built on the ``meta`` device can be counted at full
size for nothing). A kohya file holds three tensors per adapted module (``lora_down``,
``lora_up``, ``alpha``); its size is found by serializing empty tensors of those shapes with
safetensors, so the header is counted exactly (metadata excepted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lora.adapters import ADAPTER, file_module_name, named_layers
from lora.kohya import ALPHA, DOWN, SD_NAMING, UP, KohyaNaming
from lora.targets import Target

ModuleShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
Shapes = dict[str, ModuleShapes]


def live_shapes(models: Mapping[str, nn.Module | None]) -> Shapes:
    """part -> module name in files -> (down shape, up shape) of the adapters ``models`` have."""
    shapes: Shapes = {}
    for part, model in models.items():
        layers = {} if model is None else named_layers(part, model)
        shapes[part] = {
            name: (
                tuple(layer.lora_A[ADAPTER].weight.shape),
                tuple(layer.lora_B[ADAPTER].weight.shape),
            )
            for name, layer in layers.items()
        }
    return shapes


def target_shapes(part: str, model: nn.Module, targets: list[Target]) -> ModuleShapes:
    """module name in files -> (down shape, up shape) that ``targets`` would get in ``model``."""
    shapes: ModuleShapes = {}
    for target in targets:
        module = model.get_submodule(target.name)
        if isinstance(module, nn.Conv2d):
            down: tuple[int, ...] = (target.rank, module.in_channels, *module.kernel_size)
            up: tuple[int, ...] = (module.out_channels, target.rank, 1, 1)
        else:
            down, up = (target.rank, module.in_features), (module.out_features, target.rank)
        shapes[file_module_name(part, target.name)] = (down, up)
    return shapes


def kohya_file_bytes(shapes: Shapes, dtype: torch.dtype, naming: KohyaNaming) -> int:
    """The size of the kohya file of these adapters in ``dtype``, without metadata."""
    tensors = {}
    for part, modules in shapes.items():
        for module, (down, up) in modules.items():
            key = naming.name(part, module)
            tensors[f"{key}.{DOWN}"] = torch.empty(down, dtype=dtype)
            tensors[f"{key}.{UP}"] = torch.empty(up, dtype=dtype)
            tensors[f"{key}.{ALPHA}"] = torch.empty((), dtype=dtype)
    return len(safetensors.torch.save(tensors)) if tensors else 0


def _report(shapes: Shapes, full_precision: bool, naming: KohyaNaming) -> dict[str, Any]:
    models = {}
    for part, modules in shapes.items():
        parameters = sum(math.prod(d) + math.prod(u) for d, u in modules.values())
        models[part] = {
            "adapted_modules": len(modules),
            "tensors": 2 * len(modules),
            "parameters": parameters,
            "fp32_bytes": 4 * parameters,
        }
    dtype = torch.float32 if full_precision else torch.float16
    modules = sum(len(m) for m in shapes.values())
    return {
        **models,
        "kohya_file": {
            "tensors": 3 * modules,
            "dtype": str(dtype).removeprefix("torch."),
            "bytes": kohya_file_bytes(shapes, dtype, naming),
        },
    }


def lora_report(
    models: Mapping[str, nn.Module | None],
    full_precision: bool,
    naming: KohyaNaming = SD_NAMING,
) -> dict[str, Any]:
    """Per model: adapted modules, adapter tensors and parameters in memory (lora_A, lora_B)
    and their fp32 bytes; ``kohya_file``: its tensors, dtype and size without metadata."""
    return _report(live_shapes(models), full_precision, naming)


def planned_report(
    models: Mapping[str, nn.Module],
    targets: Mapping[str, list[Target]],
    full_precision: bool,
    naming: KohyaNaming = SD_NAMING,
) -> dict[str, Any]:
    """`lora_report` worked out from targets, for models without adapters (``meta`` is fine)."""
    shapes = {part: target_shapes(part, models[part], targets[part]) for part in targets}
    return _report(shapes, full_precision, naming)
