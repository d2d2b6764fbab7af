"""`ModelBundle`: the components of one Stable Diffusion model, as the trainer uses them."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class ModelBundle:
    """UNet, CLIP text encoder and tokenizer, VAE and the training noise scheduler of one model.

    ``source`` is where it came from: a built-in name, a local folder or a hub id, as given.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    source: str

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``"epsilon"`` (SD1.x, SD2.x base) or ``"v_prediction"``."""
        return str(self.noise_scheduler.config.prediction_type)
