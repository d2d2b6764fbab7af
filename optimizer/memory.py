"""Memory a run needs for weights, gradients and optimizer state, known before it starts.

Activations are measured separately (`training.activations`), since they need the model's
forward pass; the dry run adds both (`training.report.memory_report`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

FLOAT32 = 4
# Full-size state tensors per parameter element (float32).
FULL_STATES = {
    "adamw": 2,
    "lion": 1,
    "dadapt_adam": 3,
    "dadapt_lion": 2,
    "dadapt_sgd": 3,
    "adamw_schedulefree": 2,  # z and exp_avg_sq
}
# Prodigy: exp_avg and exp_avg_sq, plus s and p0 over every slice_p-th element (a parameter
# that is all zeros when training starts keeps no p0, so for fresh biases this is an upper bound).
PRODIGY_FULL, PRODIGY_SLICED = 2, 2
# bitsandbytes 8-bit optimizers: uint8 states with a float32 absmax per block of 256 elements
# and a 256-entry float32 quantisation map per state; tensors below 4096 elements stay 32-bit.
EIGHT_BIT_STATES = {"adamw8bit": 2, "lion8bit": 1}
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP_BYTES = 256 * FLOAT32
# Factored second moments (Adafactor, CAME): a tensor of two or more dimensions keeps a row and a
# column vector for each factored statistic (Adafactor: 1, CAME: 2, its residual's too) instead
# of a full tensor; a 1-D one keeps one full second moment. Besides: full tensors (CAME's exp_avg).
FACTORED = {"adafactor": (1, 0), "came": (2, 1)}


def _eight_bit_tensor_bytes(numel: int, states: int) -> int:
    if numel < BNB_MIN_8BIT_SIZE:
        return states * numel * FLOAT32
    return states * (numel + math.ceil(numel / BNB_BLOCK) * FLOAT32 + BNB_QMAP_BYTES)


def _factored_bytes(shape: tuple[int, ...], pairs: int, full: int) -> int:
    numel = math.prod(shape)
    if len(shape) < 2:
        return (1 + full) * numel * FLOAT32
    rows = math.prod(shape[:-1])
    columns = math.prod(shape[:-2]) * shape[-1]
    return (pairs * (rows + columns) + full * numel) * FLOAT32


def optimizer_state_bytes(name: str, shapes: Iterable[tuple[int, ...]], slice_p: int = 1) -> int:
    """Bytes of optimizer state for parameters of these shapes."""
    shapes = [tuple(shape) for shape in shapes]
    if name in FACTORED:
        return sum(_factored_bytes(shape, *FACTORED[name]) for shape in shapes)
    sizes = [math.prod(shape) for shape in shapes]
    if name in EIGHT_BIT_STATES:
        return sum(_eight_bit_tensor_bytes(n, EIGHT_BIT_STATES[name]) for n in sizes)
    if name == "prodigy":
        sliced = sum(math.ceil(n / slice_p) for n in sizes)
        return (PRODIGY_FULL * sum(sizes) + PRODIGY_SLICED * sliced) * FLOAT32
    return FULL_STATES[name] * sum(sizes) * FLOAT32


def _bytes(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def model_memory(
    model: torch.nn.Module, optimizer: str | None, slice_p: int = 1, fused: bool = False
) -> dict[str, Any]:
    """Weights, gradients and optimizer state of one model, in bytes. ``fused`` (a fused
    backward pass): a gradient is freed once its parameter steps, so at most about one
    parameter's gradient exists at a time (counted: the largest)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = _bytes(model.parameters())
    gradients = _bytes(trainable) if optimizer is not None else 0
    if fused and trainable and optimizer is not None:
        gradients = max(p.numel() * p.element_size() for p in trainable)
    state = (
        0
        if optimizer is None
        else optimizer_state_bytes(optimizer, (tuple(p.shape) for p in trainable), slice_p)
    )
    total = weights + gradients + state
    return {
        "optimizer": optimizer,
        "weights_bytes": weights,
        "gradients_bytes": gradients,
        "optimizer_state_bytes": state,
        "total_bytes": total,
        "total_gib": round(total / 2**30, 3),
    }
