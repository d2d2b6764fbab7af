"""The loss half of a training step: SNR, Min-SNR-gamma weights, the loss types, text perturbation.

Losses are computed in float32 whatever the dtype of the prediction (bf16/fp16 under autocast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from config.train_config import LOSS_TYPES

__all__ = [
    "LOSS_TYPES",
    "debiased_weights",
    "mean_loss",
    "min_snr_weights",
    "per_sample_loss",
    "perturb_embeddings",
    "snr",
]


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alphas_cumprod[t] / (1 - alphas_cumprod[t])`` at each timestep.

    float32, on ``timesteps``' device (diffusers' ``compute_snr``). It is 0 at the last timestep
    of a zero-terminal-SNR schedule.
    """
    return compute_snr(scheduler, timesteps)


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), float32, one per timestep.

    The paper weights the x0-space loss by ``min(snr, gamma)``. Expressed for the UNet's own
    target that is ``min(snr, gamma) / snr`` for epsilon prediction (the epsilon loss is ``snr``
    times the x0 loss) and ``min(snr, gamma) / (snr + 1)`` for v-prediction (the v loss is
    ``snr + 1`` times the x0 loss). At ``snr = 0`` (the last timestep of a zero-terminal-SNR
    schedule) the weights take their limits, 1 for epsilon and 0 for v-prediction: finite, never
    NaN or inf.
    """
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    s = snr(scheduler, timesteps)
    clipped = s.clamp(max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ValueError(
        f"Min-SNR weighting: unknown prediction_type {prediction_type!r}; "
        "supported: epsilon, v_prediction"
    )


def _elementwise_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    loss_type: str,
    huber_delta: float,
    reduction: str = "none",
) -> torch.Tensor:
    """The loss of each element (``reduction`` "mean": their mean, in the same operation where
    the loss type allows)."""
    pred = prediction.float()
    tgt = target.float()
    if loss_type == "mse":
        return F.mse_loss(pred, tgt, reduction=reduction)
    if loss_type == "huber":
        return F.huber_loss(pred, tgt, reduction=reduction, delta=huber_delta)
    if loss_type in ("mse_huber", "huber_mse"):
        mse = F.mse_loss(pred, tgt, reduction="none")
        huber = F.huber_loss(pred, tgt, reduction="none", delta=huber_delta)
        fraction = timesteps.to(device=pred.device, dtype=torch.float32)
        fraction = fraction / scheduler.config.num_train_timesteps
        fraction = fraction.view(-1, *([1] * (pred.dim() - 1)))
        if loss_type == "huber_mse":
            mse, huber = huber, mse
        blend = fraction * mse + (1.0 - fraction) * huber
        return blend.mean() if reduction == "mean" else blend
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def debiased_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample weights of kohya's debiased estimation, float32, one per timestep.

    With the SNR capped at 1000 (it is infinite at timestep 0 of some schedules): ``1 / sqrt(snr)``
    for epsilon prediction, ``1 / (snr + 1)`` for v-prediction (kohya's variant). At ``snr = 0``
    (the last timestep of a zero-terminal-SNR schedule) epsilon's weight would be infinite: the
    SNR is taken at the schedule's smallest positive value there.
    """
    s = snr(scheduler, timesteps).clamp(max=1000.0)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return 1.0 / (s + 1.0)
    if prediction_type != "epsilon":
        raise ValueError(f"debiased estimation: unknown prediction_type {prediction_type!r}")
    every = snr(scheduler, torch.arange(scheduler.config.num_train_timesteps, device=s.device))
    smallest = every[every > 0].min()
    return 1.0 / torch.sqrt(torch.where(s > 0, s, smallest))


def _per_sample_mean(
    elementwise: torch.Tensor, weights: torch.Tensor | None, normalize: bool
) -> torch.Tensor:
    """Each sample's (weighted) mean; ``normalize``: weighted sum over the sum of the weights."""
    dims = tuple(range(1, elementwise.dim()))
    if weights is None:
        return elementwise.mean(dim=dims)
    weights = weights.to(elementwise.device, torch.float32).expand_as(elementwise)
    weighted = elementwise * weights
    if normalize:
        area = weights.sum(dim=dims).clamp(min=torch.finfo(torch.float32).tiny)
        return weighted.sum(dim=dims) / area
    return weighted.mean(dim=dims)


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    loss_type: str,
    min_snr_gamma: float | None,
    huber_delta: float = 1.0,
    debiased: bool = False,
    weights: torch.Tensor | None = None,
    normalize_weights: bool = False,
) -> torch.Tensor:
    """The training loss of each sample, float32 (the step averages them over the batch).

    Per element, with ``r = prediction - target`` (both cast to float32):

    - ``"mse"``: ``r**2``;
    - ``"huber"``: ``F.huber_loss`` with ``delta = huber_delta`` (1.0, as EveryDream2):
      ``0.5 * r**2`` where ``|r| <= delta``, else ``delta * (|r| - 0.5 * delta)``. (At delta 1
      this is also smooth-L1 with beta 1.) For small residuals it is half the MSE;
    - ``"mse_huber"``: EveryDream2's blend ``f * mse + (1 - f) * huber`` with
      ``f = t / num_train_timesteps``: mostly MSE at high (noisy) timesteps, mostly Huber at
      low (nearly clean) ones;
    - ``"huber_mse"``: EveryDream2's reverse blend ``f * huber + (1 - f) * mse``: mostly Huber
      at noisy timesteps, mostly MSE at nearly clean ones.

    With ``weights`` (a loss mask, broadcast over channels) each element is weighted first.
    Then the mean over every dimension but the batch gives one loss per sample
    (``normalize_weights``: the weighted sum divided by the sum of the weights instead); with
    ``min_snr_gamma`` set, each is multiplied by its `min_snr_weights`, and with ``debiased`` by
    its `debiased_weights`.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ"
        )
    elementwise = _elementwise_loss(
        prediction, target, timesteps, scheduler, loss_type, huber_delta
    )
    loss = _per_sample_mean(elementwise, weights, normalize_weights)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weights(scheduler, timesteps, min_snr_gamma).to(loss.device)
    if debiased:
        loss = loss * debiased_weights(scheduler, timesteps).to(loss.device)
    return loss


def mean_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    loss_type: str,
    min_snr_gamma: float | None,
    *,
    huber_delta: float = 1.0,
    debiased: bool = False,
    weights: torch.Tensor | None = None,
    normalize_weights: bool = False,
    sample_scales: Sequence[float] = (),
) -> torch.Tensor:
    """The loss of a batch, float32: the mean over its samples of `per_sample_loss`, each times
    its ``sample_scales`` entry (none given: 1).

    When every sample weighs the same (no ``weights``, Min-SNR or debiasing, every scale 1) this
    is the mean over every element, which one reduction computes (the samples of a batch have
    the same shape).
    """
    unscaled = all(scale == 1.0 for scale in sample_scales)
    if unscaled and weights is None and min_snr_gamma is None and not debiased:
        return _elementwise_loss(
            prediction, target, timesteps, scheduler, loss_type, huber_delta, reduction="mean"
        )
    losses = per_sample_loss(
        prediction,
        target,
        timesteps,
        scheduler,
        loss_type,
        min_snr_gamma,
        huber_delta,
        debiased=debiased,
        weights=weights,
        normalize_weights=normalize_weights,
    )
    if unscaled:
        return losses.mean()
    scales = torch.tensor(sample_scales, dtype=losses.dtype, device=losses.device)
    return (losses * scales).mean()


def perturb_embeddings(
    embeddings: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """EveryDream2's ``embedding_perturbation``: Gaussian noise added to the text embeddings.

    ``embeddings + randn_like(embeddings) * strength / sqrt(hidden_dim)``, ``hidden_dim`` being
    the last dimension (768 for SD1.x, 1024 for SD2.x), so a perturbation vector has an expected
    norm of about ``strength`` whatever the width (following arXiv:2405.20494, as EveryDream2
    does). The noise is drawn in float32 from ``generator`` and added in the embeddings' dtype;
    gradients flow through to the text encoder unchanged. ``strength`` 0 returns ``embeddings``
    itself and draws nothing.
    """
    if strength < 0:
        raise ValueError(f"embedding_perturbation must be >= 0, got {strength}")
    if strength == 0:
        return embeddings
    deviation = strength / math.sqrt(embeddings.shape[-1])
    noise = torch.randn(
        tuple(embeddings.shape),
        generator=generator,
        device=generator.device,
        dtype=torch.float32,
    )
    return embeddings + (noise * deviation).to(device=embeddings.device, dtype=embeddings.dtype)
