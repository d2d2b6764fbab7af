"""The allowed words of train.json's choice keys, and the --help sections.

Plain constants, so that ``train.py --help`` and the optimizer package can use them without
importing diffusers.
"""

from __future__ import annotations

LOSS_TYPES = ("mse", "huber", "mse_huber", "huber_mse")
# EveryDream2's "xformers" is read as "sdp" (with a warning): PyTorch's SDPA does its job.
ATTENTION_TYPES = ("sdp", "slice", "xformers")
# Autocast choices: "auto" picks bf16/fp16/none for the device; "no" is fp32.
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")
# What a Stable Diffusion 1.x/2.x UNet predicts, as diffusers names it.
PREDICTION_TYPES = ("epsilon", "v_prediction")
# EveryDream2's training noise schedulers; the training math is the same for all three.
TRAIN_SAMPLERS = ("ddpm", "pndm", "ddim")
# Where EveryDream2 keeps the EMA copy: system memory, or the device the run trains on.
EMA_DEVICES = ("cpu", "cuda")
# diffusers.optimization.SchedulerType without piecewise_constant (it needs step rules that
# have no key here). A test checks this against diffusers, which is not imported here.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)

# --help sections, in order: group name → title.
GROUPS = {
    "model": "model and precision",
    "data": "training data",
    "lora": "LoRA / LoCon adapters (train adapters instead of the weights)",
    "optimizer": "optimizer (optimizer.json holds the rest)",
    "schedule": "run length and LR schedule",
    "training": "noise, timesteps and loss",
    "checkpoints": "checkpoints",
    "ema": "EMA (exponential moving average of the weights)",
    "samples": "sample images",
    "logging": "run folder and logging",
    "everydream2": "EveryDream2 keys that are deprecated or not supported",
}
