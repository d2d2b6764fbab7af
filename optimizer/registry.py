"""Optimizer name → class, through one registry.

Each entry names the class (imported lazily, so an optional package is needed only when its
optimizer is chosen) and the optimizer.json keys it takes. `build_optimizer` passes exactly
those keys, under the class's own keyword names.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from config.errors import UserError


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one kind of optimizer."""

    module: str
    class_name: str
    package: str  # the pip package that provides the module
    takes: tuple[str, ...]  # optimizer.json keys passed to the constructor
    adaptive: bool = False  # D-Adaptation / Prodigy: expect an LR around 0.1-1.0
    fixed: tuple[tuple[str, Any], ...] = ()  # constructor keywords optimizer.json does not set
    betas_extra: tuple[float, ...] = ()  # appended to optimizer.json's two betas (CAME's third)
    # Steps parameters sharded by FSDP (DTensors) as it steps whole ones; False for 8-bit
    # blockwise state and factored moments, which mix plain tensors into the update.
    shardable: bool = True


_ADAM = ("lr", "betas", "epsilon", "weight_decay")
_LION = ("lr", "betas", "weight_decay")

OPTIMIZERS: dict[str, OptimizerSpec] = {
    # fused: one kernel for all tensors, on the CPU (~6x faster) as on CUDA
    "adamw": OptimizerSpec("torch.optim", "AdamW", "torch", _ADAM, fixed=(("fused", True),)),
    "adamw8bit": OptimizerSpec(
        "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", _ADAM, shardable=False
    ),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch", _LION),
    "lion8bit": OptimizerSpec(
        "bitsandbytes.optim", "Lion8bit", "bitsandbytes", _LION, shardable=False
    ),
    "dadapt_adam": OptimizerSpec(
        "dadaptation",
        "DAdaptAdam",
        "dadaptation",
        (*_ADAM, "d0", "decouple", "growth_rate"),
        adaptive=True,
    ),
    "dadapt_lion": OptimizerSpec(
        "dadaptation", "DAdaptLion", "dadaptation", (*_LION, "d0"), adaptive=True
    ),
    "dadapt_sgd": OptimizerSpec(
        "dadaptation",
        "DAdaptSGD",
        "dadaptation",
        ("lr", "momentum", "weight_decay", "d0", "growth_rate"),
        adaptive=True,
    ),
    "prodigy": OptimizerSpec(
        "prodigyopt",
        "Prodigy",
        "prodigyopt",
        (
            *_ADAM,
            "d0",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
            "growth_rate",
            "slice_p",
        ),
        adaptive=True,
    ),
    # transformers' Adafactor on optimizer.json's LR schedule: its own relative step, parameter
    # scaling and warm-up off (the external-LR setting kohya uses for SDXL); no first moment.
    "adafactor": OptimizerSpec(
        "transformers.optimization",
        "Adafactor",
        "transformers",
        ("lr", "weight_decay"),
        fixed=(("relative_step", False), ("scale_parameter", False), ("warmup_init", False)),
        shardable=False,
    ),
    # Schedule-free AdamW on optimizer.json's LR schedule (its own warm-up off): the trainer
    # evaluates, samples and saves its evaluation weights (optimizer.schedule_free).
    "adamw_schedulefree": OptimizerSpec(
        "schedulefree", "AdamWScheduleFree", "schedulefree", _ADAM, fixed=(("warmup_steps", 0),)
    ),
    # CAME: optimizer.json's betas are its first two; the third (its confidence) stays 0.9999.
    "came": OptimizerSpec(
        "came_pytorch",
        "CAME",
        "came-pytorch",
        ("lr", "betas", "weight_decay"),
        betas_extra=(0.9999,),
        shardable=False,
    ),
}

# Constructor keywords that choose how torch steps, not what the step computes.
IMPLEMENTATION_KEYS = ("fused", "foreach")

# optimizer.json key → constructor keyword, where they differ.
_KEYWORD = {"epsilon": "eps"}


def optimizer_names() -> tuple[str, ...]:
    """Every valid `optimizer` value."""
    return tuple(OPTIMIZERS)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Import and return the class for a registered name, with an install hint if missing."""
    spec = OPTIMIZERS[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise UserError(
            f"optimizer '{name}' needs the package '{spec.package}', which cannot be imported "
            f"({exc}); install it with: pip install {spec.package}"
        ) from None
    return getattr(module, spec.class_name)


def constructor_kwargs(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the optimizer is built with, from resolved optimizer.json values."""
    spec = OPTIMIZERS[name]
    kwargs: dict[str, Any] = {}
    for key in spec.takes:
        value = values[key]
        kwargs[_KEYWORD.get(key, key)] = tuple(value) if key == "betas" else value
    if spec.betas_extra:
        kwargs["betas"] = (*kwargs["betas"], *spec.betas_extra)
    kwargs |= dict(spec.fixed)
    return kwargs


def build_optimizer(
    name: str, parameters: Iterable[torch.nn.Parameter], values: dict[str, Any]
) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Build one optimizer; returns it and the keywords it was built with."""
    kwargs = constructor_kwargs(name, values)
    return optimizer_class(name)(list(parameters), **kwargs), kwargs


@contextlib.contextmanager
def keeping_implementation(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around loading a saved state into ``optimizer``: its parameter groups keep the
    `IMPLEMENTATION_KEYS` it was built with, which a saved state would replace with its own (a
    checkpoint of an unfused AdamW resumes fused; unfused, torch's fp16 grad scaler would hand
    a fused optimizer's scale to a step that refuses it)."""
    built = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    yield
    for group, keys in zip(optimizer.param_groups, built, strict=True):
        group.update(keys)
