"""Sample images during training: reading ``sample_prompts`` and making images.

- `training.samples.prompts`: reading and checking the file (`load_sample_settings`), at start-up,
  without diffusers;
- `training.samples.images`: making images with the live model (`generate_samples`);
- `training.samples.schedulers`: the sampling scheduler names and `make_inference_scheduler`;
- `training.samples.settings`: `SampleRequest` and `SampleSettings`.
"""

from training.samples.images import ImageSink, SampleBatch, SamplingModel, generate_samples
from training.samples.prompts import (
    load_sample_prompts,
    load_sample_settings,
    size_for_aspect_ratio,
)
from training.samples.schedulers import SCHEDULERS, make_inference_scheduler, scheduler_problem
from training.samples.settings import DEFAULT_SCHEDULER, SampleRequest, SampleSettings

__all__ = [
    "DEFAULT_SCHEDULER",
    "SCHEDULERS",
    "ImageSink",
    "SampleBatch",
    "SampleRequest",
    "SampleSettings",
    "SamplingModel",
    "generate_samples",
    "load_sample_prompts",
    "load_sample_settings",
    "make_inference_scheduler",
    "scheduler_problem",
    "size_for_aspect_ratio",
]
