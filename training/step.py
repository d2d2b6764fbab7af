"""The loss of one micro-batch: VAE → noisy latents → text encoder → UNet → loss.

Every random draw (VAE sample, noise, timesteps, embedding perturbation) is made for the
whole global batch of all processes from one generator and then sliced to this process's
share. So N processes with batch B see exactly the draws one process with batch N×B sees, and
a resumed run continues the generator where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from config.live import StepSettings
from data import Batch
from data.masks import MaskLoader
from models import add_time_ids, added_cond_kwargs, encode_prompts, encode_prompts_sdxl, tokenize
from models.bundle import ModelBundle
from training.conditioning import Conditioning
from training.loss import mean_loss, perturb_embeddings
from training.noise import sample_noise, sample_timesteps, training_target
from training.precision import Precision


@dataclass(frozen=True)
class Shard:
    """This process's slice of every global batch."""

    rank: int = 0
    world_size: int = 1

    def take(self, global_tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return global_tensor
        size = global_tensor.shape[0] // self.world_size
        return global_tensor[self.rank * size : (self.rank + 1) * size]


class PromptEncoder(torch.nn.Module):
    """Token ids → the UNet's text conditioning, with ``clip_skip``, as one module.

    Keeping the whole encoding inside one ``forward`` lets DDP wrap it (the final layer norm
    that ``clip_skip`` applies to an inner layer's output is part of it). SDXL's ids hold both
    tokenizers' rows (``[B, 2, 77]``) and both encoders run (`models.text.encode_prompts_sdxl`).
    """

    def __init__(
        self,
        text_encoder: torch.nn.Module,
        clip_skip: int,
        text_encoder_2: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.clip_skip = clip_skip

    @classmethod
    def of(cls, bundle: ModelBundle, clip_skip: int) -> PromptEncoder:
        return cls(bundle.text_encoder, clip_skip, bundle.text_encoder_2)

    def forward(self, input_ids: torch.Tensor) -> Conditioning:
        if self.text_encoder_2 is None:
            return Conditioning(encode_prompts(self.text_encoder, input_ids, self.clip_skip))
        embeds, pooled = encode_prompts_sdxl(
            self.text_encoder, self.text_encoder_2, input_ids[:, 0], input_ids[:, 1], self.clip_skip
        )
        return Conditioning(embeds, pooled)


class CaptionTokenizer:
    """Token ids of captions, remembered: most captions come back every epoch. With SDXL's
    second tokenizer, each caption's ids are both tokenizers' rows (``[B, 2, 77]``)."""

    def __init__(self, tokenizer: Any, capacity: int = 65536, tokenizer_2: Any = None) -> None:
        self.tokenizers = (tokenizer,) if tokenizer_2 is None else (tokenizer, tokenizer_2)
        self.capacity = capacity
        self._ids: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def of(cls, bundle: ModelBundle) -> CaptionTokenizer:
        return cls(bundle.tokenizer, tokenizer_2=bundle.tokenizer_2)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            rows = [tokenize(tokenizer, missing) for tokenizer in self.tokenizers]
            ids = rows[0] if len(rows) == 1 else torch.stack(rows, dim=1)
            for caption, caption_ids in zip(missing, ids, strict=True):
                self._ids[caption] = caption_ids
        batch = torch.stack([self._ids[c] for c in captions])
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return batch


def size_conditioning(batch: Batch) -> torch.Tensor:
    """SDXL's time ids of a batch (`models.sdxl.add_time_ids`): each image's original size,
    crop and the bucket, as (height, width) and (top, left)."""
    width, height = batch.bucket
    return add_time_ids(
        [(h, w) for w, h in batch.original_sizes],
        [(top, left) for left, top in batch.crops],
        [(height, width)] * len(batch),
    )


@dataclass
class StepModels:
    """The callables of a step (possibly wrapped for DDP or compiled) and what trains."""

    bundle: ModelBundle
    unet: torch.nn.Module
    prompt_encoder: torch.nn.Module  # a PromptEncoder, possibly wrapped
    noise_scheduler: DDPMScheduler
    train_text_encoder: bool
    tokens: CaptionTokenizer


@dataclass(frozen=True)
class LatentDistribution:
    """The VAE's Gaussian over latents (already scaled): what a latent cache stores; with
    ``masked_loss``, each image's loss mask at latent size ([batch, 1, h, w] in [0, 1])."""

    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor | None = None


def with_masks(dist: LatentDistribution, batch: Batch, loader: MaskLoader) -> LatentDistribution:
    """``dist`` with the latent-size masks of the batch's images, on the latents' device."""
    size = (dist.mean.shape[-2], dist.mean.shape[-1])
    masks = loader.masks(batch.paths, batch.bucket, batch.flipped, size)
    return dataclasses.replace(dist, mask=masks.to(dist.mean.device))


def encode_latent_distribution(
    bundle: ModelBundle, pixels: torch.Tensor, precision: Precision
) -> LatentDistribution:
    """The frozen VAE's posterior for a batch of images in [-1, 1], scaled for the UNet. SDXL's
    VAE overflows in fp16 (NaN latents): under an fp16 autocast it encodes in fp32, as
    diffusers' SDXL training scripts keep it."""
    scale = bundle.vae.config.scaling_factor
    autocast = precision.autocast()
    if bundle.text_encoder_2 is not None and precision.dtype == torch.float16:
        autocast = torch.autocast(precision.device_type, enabled=False)
    with torch.no_grad(), autocast:
        dist = bundle.vae.encode(pixels).latent_dist
    return LatentDistribution(dist.mean.float() * scale, dist.std.float() * scale)


def _global_like(local: torch.Tensor, shard: Shard) -> torch.Tensor:
    """An empty tensor shaped like the global batch that ``local`` is a slice of."""
    return local.new_empty((local.shape[0] * shard.world_size, *local.shape[1:]))


@dataclass(frozen=True)
class Noised:
    """The noisy latents of a batch, their timesteps and what the UNet should predict."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def noise_latents(
    scheduler: DDPMScheduler,
    latents_dist: LatentDistribution,
    config: StepSettings,
    generator: torch.Generator,
    shard: Shard,
) -> Noised:
    """A VAE sample, noise and timesteps (drawn for the global batch, sliced), noised."""
    device = latents_dist.mean.device
    global_shape = _global_like(latents_dist.mean, shard)
    eps = torch.randn(
        global_shape.shape, generator=generator, device=device, dtype=global_shape.dtype
    )
    latents = latents_dist.mean + latents_dist.std * shard.take(eps)
    noise = shard.take(
        sample_noise(
            global_shape,
            generator,
            config.zero_frequency_noise_ratio,
            config.pyramid_noise_discount,
        )
    )
    timesteps = shard.take(
        sample_timesteps(
            global_shape.shape[0],
            config.timestep_start,
            config.timestep_end,
            generator,
            device,
            num_train_timesteps=scheduler.config.num_train_timesteps,
        )
    )
    noisy = scheduler.add_noise(latents, _perturbed(noise, config, generator, shard), timesteps)
    return Noised(noisy, timesteps, training_target(scheduler, latents, noise, timesteps))


def _perturbed(
    noise: torch.Tensor, config: StepSettings, generator: torch.Generator, shard: Shard
) -> torch.Tensor:
    """Input perturbation (diffusers'): the latents are noised with ``noise + p * randn``,
    drawn for the global batch; the target keeps ``noise``. Off (0): nothing is drawn."""
    if config.input_perturbation == 0:
        return noise
    extra = torch.randn(
        _global_like(noise, shard).shape,
        generator=generator,
        device=noise.device,
        dtype=noise.dtype,
    )
    return noise + config.input_perturbation * shard.take(extra)


def _mask_weights(mask: torch.Tensor | None, config: StepSettings) -> torch.Tensor | None:
    """Per-element loss weights of a masked batch: 1 inside the mask, ``unmasked_weight``
    outside (in between where the mask is grey)."""
    if mask is None:
        return None
    return config.unmasked_weight + (1.0 - config.unmasked_weight) * mask


def _unet_conditioning(
    conditioning: Conditioning,
    batch: Batch,
    config: StepSettings,
    generator: torch.Generator,
    shard: Shard,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The UNet's text embeddings (perturbed, drawn for the global batch like the rest) and, for
    SDXL, its added conditions (pooled embedding and the batch's time ids)."""
    embeddings = conditioning.embeds
    if config.embedding_perturbation > 0:
        zeros = _global_like(embeddings, shard).zero_()
        strength = config.embedding_perturbation
        embeddings = embeddings + shard.take(perturb_embeddings(zeros, strength, generator))
    if conditioning.pooled is None:
        return embeddings, None
    return embeddings, added_cond_kwargs(conditioning.pooled, size_conditioning(batch))


def batch_loss(
    models: StepModels,
    latents_dist: LatentDistribution,
    batch: Batch,
    config: StepSettings,
    generator: torch.Generator,
    precision: Precision,
    shard: Shard,
) -> torch.Tensor:
    """The scalar loss of one micro-batch (not yet divided for accumulation).

    VAE sample → noise and timesteps → noisy latents; captions → text embeddings (perturbed);
    UNet → prediction; loss against the target per image, times each image's loss scale,
    averaged over the batch. ``config`` holds the live settings that shape the step.
    """
    scheduler = models.noise_scheduler
    noised = noise_latents(scheduler, latents_dist, config, generator, shard)
    ids = models.tokens(list(batch.captions)).to(noised.latents.device)
    grad = contextlib.nullcontext() if models.train_text_encoder else torch.no_grad()
    with precision.autocast():
        with grad:
            conditioning = models.prompt_encoder(ids)
        embeddings, added = _unet_conditioning(conditioning, batch, config, generator, shard)
        prediction = models.unet(
            noised.latents,
            noised.timesteps,
            encoder_hidden_states=embeddings,
            added_cond_kwargs=added,
        ).sample
    return mean_loss(
        prediction,
        noised.target,
        noised.timesteps,
        scheduler,
        config.loss_type,
        config.min_snr_gamma,
        debiased=config.debiased_estimation,
        weights=_mask_weights(latents_dist.mask, config),
        normalize_weights=config.normalize_masked_area_loss,
        sample_scales=batch.loss_scales,
    )
