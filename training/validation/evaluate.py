"""One validation pass over a set: the mean loss of its images, the same every time.

Each batch's draws (VAE sample, noise, timesteps) come from a generator seeded by (validation
seed, set, batch index) alone, so a pass on unchanged weights gives the same number, whatever
the number of processes and however many passes ran before. The pass runs without gradients,
with the unwrapped models in eval mode (their modes restored after), and never touches the
training generator, torch's global RNG or the data order: exact resume and the equivalence of
N processes with one are kept.

The loss is EveryDream2's validation loss: plain MSE against the target, without offset noise,
embedding perturbation, Min-SNR weighting or loss_scale (pyramid noise and the timestep range
are the training's). It is the mean over the set's images; with several processes each takes
batches i ≡ rank (mod processes) and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

from config.live import StepSettings
from data import Batch, BatchPlan
from data.fixed_loader import fixed_batch_loader
from data.masks import MaskLoader
from models.bundle import ModelBundle
from training.disk_cache import DiskLatentCache, latent_cache_for
from training.distributed import sum_over_processes
from training.latent_cache import LatentCache
from training.precision import Precision
from training.step import (
    LatentDistribution,
    PromptEncoder,
    Shard,
    StepModels,
    batch_loss,
    encode_latent_distribution,
    with_masks,
)
from training.text_cache import text_encoders_on
from training.validation.sets import EvalSet

BAR_WIDTH = 80


def batch_seed(seed: int, set_name: str, index: int) -> int:
    """The seed of batch ``index`` of a set's every pass."""
    text = f"dreamtrainer-validation:{seed}:{set_name}:{index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def evaluation_settings(config: StepSettings) -> StepSettings:
    """The step settings in force with what EveryDream2's validation step leaves out turned
    off (a `StepSettings`, whatever subclass ``config`` is)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(StepSettings)}
    values |= {
        "zero_frequency_noise_ratio": 0.0,
        "embedding_perturbation": 0.0,
        "loss_type": "mse",
        "min_snr_gamma": None,
        "debiased_estimation": False,
        "input_perturbation": 0.0,
    }
    return StepSettings(**values)


def evaluation_models(models: StepModels, clip_skip: int) -> StepModels:
    """The step's models unwrapped (no DDP, not compiled) and not training."""
    bundle = models.bundle
    return StepModels(
        bundle=bundle,
        unet=bundle.unet,
        prompt_encoder=PromptEncoder.of(bundle, clip_skip),
        noise_scheduler=models.noise_scheduler,
        train_text_encoder=False,
        tokens=models.tokens,
    )


@contextlib.contextmanager
def evaluation_mode(modules: Iterable[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """No gradients, eval mode (every submodule's mode restored after), RNG states restored."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            for module, _ in saved:
                module.eval()
            yield
    finally:
        for module, training in saved:
            module.train(training)


class Evaluator:
    """Runs passes over sets with one run's models, precision and processes."""

    def __init__(
        self,
        models: StepModels,
        clip_skip: int,
        precision: Precision,
        device: torch.device,
        shard: Shard,
        show_progress: bool,
        masks: MaskLoader | None = None,
        equal_passes: bool = False,
    ) -> None:
        """``masks``: weight the loss by each image's mask (``masked_loss``); ``equal_passes``:
        every process runs as many forward passes (sharded models gather their weights in each
        one), the extra ones not counted."""
        self.models = evaluation_models(models, clip_skip)
        self.equal_passes = equal_passes
        self.masks = masks
        self.precision = precision
        self.device = device
        self.shard = shard
        self.show_progress = show_progress
        self.caches: dict[str, LatentCache | DiskLatentCache] = {}

    @property
    def bundle(self) -> ModelBundle:
        return self.models.bundle

    def cache_latents(self, sets: Iterable[EvalSet], cache_dir: str | None = None) -> None:
        """Encode every image of the sets once (``cache_latents``), in memory or in
        ``cache_dir`` (``latent_cache_dir``); passes then reuse them."""
        with evaluation_mode([self.bundle.vae], self.device):
            for eval_set in sets:
                self.caches[eval_set.name] = latent_cache_for(
                    eval_set.dataset, self.bundle, self.precision, self.device, cache_dir
                )

    def loss(self, eval_set: EvalSet, settings: StepSettings) -> float:
        """The mean loss over the set's images (every process gets the same value), with the
        step settings in force (see `evaluation_settings`)."""
        settings = evaluation_settings(settings)
        mine = eval_set.plans[self.shard.rank :: self.shard.world_size]
        counted = len(mine)
        if self.equal_passes:
            passes = -(-len(eval_set.plans) // self.shard.world_size)
            mine += eval_set.plans[: passes - counted]
        encoders = self.bundle.text_encoders
        modules = [self.bundle.unet, *encoders, self.bundle.vae]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        images = 0
        bar = tqdm(
            total=len(mine),
            desc=f"validate {eval_set.name}"[:30],
            unit="batch",
            leave=False,
            ncols=BAR_WIDTH,
            dynamic_ncols=False,
            # a second bar moves the cursor: on a terminal only, never into a log file
            disable=not (self.show_progress and sys.stderr.isatty()),
        )
        on = text_encoders_on(encoders, self.device)
        with bar, evaluation_mode(modules, self.device), on:
            for index, (batch, latents) in enumerate(self._batches(eval_set, mine)):
                if self.masks is not None:
                    latents = with_masks(latents, batch, self.masks)
                seed = batch_seed(eval_set.dataset.settings.seed, eval_set.name, batch.index)
                generator = torch.Generator(device=self.device).manual_seed(seed)
                loss = batch_loss(
                    self.models, latents, batch, settings, generator, self.precision, Shard()
                )
                bar.update(1)
                if index >= counted:
                    continue
                total += loss.double() * len(batch)
                images += len(batch)
        sums = sum_over_processes(torch.stack([total, total.new_tensor(float(images))]))
        return float(sums[0] / sums[1])

    def _batches(
        self, eval_set: EvalSet, plans: tuple[BatchPlan, ...]
    ) -> Iterator[tuple[Batch, LatentDistribution]]:
        """This process's batches of the set and their latents (cached or encoded now)."""
        cache = self.caches.get(eval_set.name)
        if cache is not None:
            for plan in plans:
                batch = Batch.of(0, plan)
                yield batch, cache.latents(batch)
            return
        pin = self.device.type == "cuda"
        for batch in fixed_batch_loader(eval_set.dataset, plans, pin_memory=pin):
            assert batch.pixel_values is not None
            pixels = batch.pixel_values.to(self.device, non_blocking=pin)
            yield batch, encode_latent_distribution(self.bundle, pixels, self.precision)
