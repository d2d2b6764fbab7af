"""The baseline of `bench_overhead.py`: a bare hand-written diffusers training loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from training.build import Run

BARE_SEED = 1234
# The parts of a step that bench_phases.py times on both sides, in order.
PHASES = ("latents", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class BareBatch:
    pixels: torch.Tensor
    input_ids: torch.Tensor


class BareLoop:
    """A hand-written diffusers training loop over a fixed list of batches (cycled).

    It trains the trainer's own modules (the very objects, with its own AdamW): the same
    weights in the same memory, so that only the code around the models differs. (On the CPU a
    model built early in a process runs about 1% slower than the same model built later: see
    `bench_overhead.py`.) The trainer must not hook them (``fused_backward_pass`` steps
    parameters inside any backward pass: refused).
    """

    def __init__(self, run: Run, batches: list[BareBatch], clip_grad_norm: float | None) -> None:
        unet, text_encoder = run.unet_training, run.text_encoder_training
        assert unet is not None and text_encoder is not None
        for model in (unet, text_encoder):
            if model.settings.name != "adamw":
                raise SystemExit(
                    f"the bare loop uses torch AdamW; the trainer's {model.model_name} uses "
                    f"{model.settings.name}"
                )
        if run.train.config.fused_backward_pass:
            raise SystemExit("the bare loop shares the trainer's modules: no fused_backward_pass")
        bundle = run.models
        self.vae, self.unet, self.text_encoder = bundle.vae, bundle.unet, bundle.text_encoder
        self.vae.requires_grad_(False).eval()
        self.unet.train()
        self.text_encoder.train()
        self.noise_scheduler = DDPMScheduler.from_config(bundle.noise_scheduler.config)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(self.unet.parameters()), **unet.kwargs},
                {"params": list(self.text_encoder.parameters()), **text_encoder.kwargs},
            ]
        )
        self.scheduler = get_scheduler(
            unet.settings.value("lr_scheduler"),
            self.optimizer,
            num_warmup_steps=unet.length.warmup_steps,
            num_training_steps=unet.length.decay_steps,
        )
        self.batches = batches
        self.clip_grad_norm = clip_grad_norm
        self.generator = torch.Generator().manual_seed(BARE_SEED)
        self.position = 0

    def step(self, phases: dict[str, float] | None = None) -> None:
        """One training step; ``phases`` (when given) gets the seconds of its parts, under the
        names `bench_phases.py` gives the trainer's: latents, forward, backward, optimizer."""
        marks = [time.perf_counter()]
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        scheduler = self.noise_scheduler
        with torch.no_grad():
            posterior = self.vae.encode(batch.pixels).latent_dist
            latents = posterior.sample(self.generator) * self.vae.config.scaling_factor
        marks.append(time.perf_counter())
        noise = torch.randn(latents.shape, generator=self.generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.generator
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        embeddings = self.text_encoder(batch.input_ids)[0]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=embeddings).sample
        loss = F.mse_loss(prediction.float(), target.float())
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if self.clip_grad_norm is not None:
            # the lists built once: walking the UNet's modules for them takes about 0.3 ms
            for group in self.optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if phases is not None:
            for name, start, end in zip(PHASES, marks, marks[1:], strict=False):
                phases[name] = end - start

    def run_steps(self, count: int) -> float:
        """Seconds for ``count`` steps."""
        started = time.perf_counter()
        for _ in range(count):
            self.step()
        return time.perf_counter() - started
