"""Mixed precision: which autocast dtype, and the fp16 grad scaler with EveryDream2's tweaks."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# EveryDream2's fp16 grad scaler: a high initial scale that grows fast early in the run...
INITIAL_SCALE = 2**17.5
INITIAL_GROWTH_FACTOR = 2.0
INITIAL_GROWTH_INTERVAL = 25
# ...and, with apply_grad_scaler_step_tweaks, grows ever more slowly as the run settles:
# at optimizer step -> (growth factor, growth interval); the backoff factor is 1/growth.
SCALER_TWEAKS = {500: (1.8, 100), 1000: (1.6, 200), 2000: (1.3, 500), 4000: (1.15, 2000)}
# GPUs compute in bf16 natively from compute capability 8.0 (Ampere); older ones (T4, V100,
# RTX 20xx) only emulate it, slowly, though torch.cuda.is_bf16_supported() may say True.
NATIVE_BF16_CAPABILITY = (8, 0)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None: full fp32) on which device type."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def uses_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        return "fp32" if self.dtype is None else f"{self.dtype} autocast".replace("torch.", "")


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes in bf16 natively (not by emulation)."""
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def choose_precision(device: torch.device, mixed_precision: str, disable_amp: bool) -> Precision:
    """The autocast of ``mixed_precision`` on ``device``.

    "auto": bf16 on CUDA GPUs with native bf16, fp16 (with the grad scaler) on older GPUs, fp32
    on the CPU (CPU autocast is slower than fp32 on most CPUs). "bf16"/"fp16" are used as asked,
    on the CPU too; "no" or ``disable_amp`` is fp32.
    """
    if disable_amp:
        mixed_precision = "no"
    if mixed_precision == "auto":
        if device.type != "cuda":
            return Precision(device.type, None)
        mixed_precision = "bf16" if native_bf16(device) else "fp16"
    if mixed_precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        logger.warning("mixed_precision bf16: this GPU only emulates bf16 (slow); fp16 is faster")
    return Precision(device.type, DTYPES[mixed_precision])


def make_grad_scaler(precision: Precision) -> torch.amp.GradScaler:
    """A grad scaler, enabled only for fp16."""
    return torch.amp.GradScaler(
        precision.device_type if precision.device_type == "cuda" else "cpu",
        enabled=precision.uses_grad_scaler,
        init_scale=INITIAL_SCALE,
        growth_factor=INITIAL_GROWTH_FACTOR,
        backoff_factor=1.0 / INITIAL_GROWTH_FACTOR,
        growth_interval=INITIAL_GROWTH_INTERVAL,
    )


def tweak_grad_scaler(scaler: torch.amp.GradScaler, optimizer_step: int) -> None:
    """EveryDream2's step-dependent growth schedule (apply_grad_scaler_step_tweaks)."""
    if not scaler.is_enabled() or optimizer_step not in SCALER_TWEAKS:
        return
    factor, interval = SCALER_TWEAKS[optimizer_step]
    scaler.set_growth_factor(factor)
    scaler.set_backoff_factor(1.0 / factor)
    scaler.set_growth_interval(interval)
    logger.info(
        "grad scaler: growth factor %g every %d steps from step %d",
        factor,
        interval,
        optimizer_step,
    )
