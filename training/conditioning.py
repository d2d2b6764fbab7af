"""`Conditioning`: what the UNet is conditioned on, as the prompt encoders return it (kept apart
from `training.step` so that light modules can use it without importing the model libraries)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Conditioning(NamedTuple):
    """What the UNet is conditioned on besides the noisy latents and the timesteps: the text
    embeddings ``[B, 77, width]`` and, for SDXL, the pooled embedding ``[B, projection]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
