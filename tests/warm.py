"""Imported by `tests.group`'s forkserver only: one step's work on ``tiny-sd15`` before any
process forks, so each forked process starts with torch's and diffusers' first-call costs paid
(kernel and dispatch set-up, the memory forecast's fake tensors). It makes no process group, no
accelerate state, no threads and no log handlers.

It runs on one torch thread: a process forked from one whose OpenMP (libgomp) ran a team of
threads hangs at its first parallel operation. Each forked process sets its own count
(`tests.group`)."""

from __future__ import annotations

import torch

from models import load_models
from training.activations import step_activations


def _warm() -> None:
    bundle = load_models("tiny-sd15")
    step_activations(bundle.unet, [bundle.text_encoder], 1, (64, 64), False, None)
    tokens = bundle.tokenizer(["warm"], padding="max_length", return_tensors="pt").input_ids
    states = bundle.text_encoder(tokens)[0]
    latents = torch.randn(1, bundle.unet.config.in_channels, 8, 8)
    loss = bundle.unet(latents, 1, states).sample.float().pow(2).mean()
    loss.backward()
    torch.optim.AdamW(bundle.unet.parameters()).step()


torch.set_num_threads(1)
_warm()
