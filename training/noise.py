"""The noising half of a training step: noise schedule, timesteps, noise and the UNet's target.

Every random draw takes an explicit ``torch.Generator`` and never touches the global RNG, so a run
that saves the generator's state and restores it on resume draws exactly the same numbers. Draws
are made on the generator's device (in float32) and then moved to the tensors' device and dtype:
a generator on the training device is fastest, a CPU generator works too.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDPMScheduler

logger = logging.getLogger(__name__)

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
"""What a Stable Diffusion 1.x/2.x UNet predicts, as diffusers names it."""

PYRAMID_MAX_LEVELS = 10
"""Most levels of pyramid noise (EveryDream2's loop count); it stops earlier at a 1-pixel level."""


def make_noise_scheduler(scheduler: DDPMScheduler, enable_zero_terminal_snr: bool) -> DDPMScheduler:
    """A fresh `DDPMScheduler` built from ``scheduler``'s config, for noising training latents.

    With ``enable_zero_terminal_snr`` the betas are rescaled to zero terminal SNR (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed") by diffusers itself
    (``rescale_betas_zero_snr=True``): ``alphas_cumprod[-1]`` becomes exactly 0, so the last
    timestep is pure noise. Without it the model's own config is kept as it is (a model whose
    scheduler config already says ``rescale_betas_zero_snr`` keeps it). The prediction type and
    every other setting are the model's.
    """
    overrides: dict[str, object] = {}
    if enable_zero_terminal_snr:
        # "trailing" spacing makes samplers start from the last (pure-noise) timestep.
        overrides |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    fresh = DDPMScheduler.from_config(scheduler.config, **overrides)
    prediction_type = fresh.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"the model's noise scheduler has prediction_type {prediction_type!r}; "
            f"supported: {', '.join(PREDICTION_TYPES)}"
        )
    logger.debug(
        "noise scheduler: %s, zero terminal SNR %s",
        prediction_type,
        bool(fresh.config.rescale_betas_zero_snr),
    )
    return fresh


def timestep_range(
    timestep_start: int, timestep_end: int, num_train_timesteps: int | None = None
) -> tuple[int, int]:
    """The half-open range ``[start, end)`` that timesteps are drawn from.

    ``start`` is raised to 0 and, when ``num_train_timesteps`` is given, ``end`` is lowered to
    it (a timestep must index the noise schedule). An empty range is a ValueError.
    """
    start = max(0, timestep_start)
    end = timestep_end if num_train_timesteps is None else min(timestep_end, num_train_timesteps)
    if start >= end:
        limit = (
            "" if num_train_timesteps is None else f", num_train_timesteps {num_train_timesteps}"
        )
        raise ValueError(
            f"empty timestep range: timestep_start {timestep_start}, timestep_end "
            f"{timestep_end}{limit}"
        )
    return start, end


def sample_timesteps(
    batch_size: int,
    timestep_start: int,
    timestep_end: int,
    generator: torch.Generator,
    device: torch.device | str,
    *,
    num_train_timesteps: int | None = None,
) -> torch.LongTensor:
    """``batch_size`` timesteps drawn uniformly from the integers in ``[start, end)``.

    ``start``/``end`` are EveryDream2's ``timestep_start``/``timestep_end``, clipped by
    `timestep_range` (pass ``num_train_timesteps=scheduler.config.num_train_timesteps`` to clip
    ``end`` to the schedule). One independent draw per sample.
    """
    start, end = timestep_range(timestep_start, timestep_end, num_train_timesteps)
    timesteps = torch.randint(
        start, end, (batch_size,), generator=generator, device=generator.device
    )
    return timesteps.to(device=device, dtype=torch.long)


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def pyramid_noise(
    shape: tuple[int, ...], discount: float, generator: torch.Generator
) -> torch.Tensor:
    """Multi-resolution ("pyramid") Gaussian noise of ``shape`` (B, C, H, W), unit std per sample.

    ``n = randn(B, C, H, W) + sum_i discount**i * up(randn(B, C, h_i, w_i))`` over levels
    ``i = 0, 1, ...`` (at most `PYRAMID_MAX_LEVELS`), with ``h_i = max(1, int(H / r_i**i))`` and
    ``w_i = max(1, int(W / r_i**i))``. ``r_0 = 1`` (level 0 is a second full-resolution draw, as
    in EveryDream2 and kohya); ``r_1 .. r_9 = 2 + 2 * rand(9)`` (uniform in [2, 4)) are drawn
    first. ``up`` is bilinear upsampling to (H, W) (``align_corners=False``). The levels stop
    after the first one that is 1 pixel high or wide. Each sample is then divided by its own
    standard deviation over (C, H, W), so its noise does not depend on the other images in the
    batch.
    """
    batch, channels, height, width = shape
    noise = _randn(shape, generator)
    # r_1 .. r_(L-1), drawn at once (one device sync); level 0 needs none
    draws = torch.rand(PYRAMID_MAX_LEVELS - 1, generator=generator, device=generator.device)
    rs = [1.0, *(2.0 + 2.0 * draws).tolist()]
    for level in range(PYRAMID_MAX_LEVELS):
        ratio = rs[level] ** level
        h, w = max(1, int(height / ratio)), max(1, int(width / ratio))
        coarse = _randn((batch, channels, h, w), generator)
        if (h, w) != (height, width):
            coarse = F.interpolate(coarse, size=(height, width), mode="bilinear")
        noise += coarse * discount**level
        if h == 1 or w == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator,
    zero_frequency_noise_ratio: float,
    pyramid_noise_discount: float | None,
) -> torch.Tensor:
    """Noise for ``latents`` (B, C, H, W): same shape, device and dtype, drawn from ``generator``.

    1. Base noise: standard Gaussian; or, when ``pyramid_noise_discount`` is set and above 0,
       `pyramid_noise` with that discount (0 and None both mean plain Gaussian, as in EveryDream2:
       at discount 0 pyramid noise is plain Gaussian noise anyway).
    2. Offset noise (https://www.crosslabs.org/blog/diffusion-with-offset-noise), when
       ``zero_frequency_noise_ratio`` > 0: ``noise + ratio * randn(B, C, 1, 1)``, one extra
       constant per image and channel, as EveryDream2 does. At 0 nothing is drawn.
    """
    if zero_frequency_noise_ratio < 0:
        raise ValueError(
            f"zero_frequency_noise_ratio must be >= 0, got {zero_frequency_noise_ratio}"
        )
    if pyramid_noise_discount is not None and pyramid_noise_discount < 0:
        raise ValueError(f"pyramid_noise_discount must be >= 0, got {pyramid_noise_discount}")
    if latents.dim() != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    shape = tuple(latents.shape)
    if pyramid_noise_discount is not None and pyramid_noise_discount > 0:
        noise = pyramid_noise(shape, pyramid_noise_discount, generator)
    else:
        noise = _randn(shape, generator)
    if zero_frequency_noise_ratio > 0:
        noise = noise + zero_frequency_noise_ratio * _randn((shape[0], shape[1], 1, 1), generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def training_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet must predict: ``noise`` for epsilon prediction, the velocity for v-prediction.

    The velocity is diffusers' ``scheduler.get_velocity(latents, noise, timesteps)``:
    ``v = sqrt(alphas_cumprod[t]) * noise - sqrt(1 - alphas_cumprod[t]) * latents``.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}"
    )
