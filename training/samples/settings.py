"""What sample images to make: one `SampleRequest` per image, and the file's `SampleSettings`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SCHEDULER = "ddim"
DEFAULT_INFERENCE_STEPS = 30
# EveryDream2's guidance scales for every prompt when a file sets none (a .txt never does).
DEFAULT_CFGS = (7.0, 4.0, 1.01)
# Without prompts EveryDream2 draws min(4, batch_size // 2) random training captions.
MAX_RANDOM_CAPTIONS = 4
RANDOM_SEED = -1  # EveryDream2: a new random seed each time samples are made


@dataclass(frozen=True)
class SampleRequest:
    """One sample image: what to draw and how.

    ``width``/``height`` None: the model's native size (`load_sample_settings` always fills
    them with the training resolution). ``seed`` -1: a new random seed each time samples are
    made. ``caption_index`` k (EveryDream2's ``random_caption``): ``prompt`` is replaced by
    caption ``k mod n`` of the ``captions`` given to `generate_samples`.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = 555
    width: int | None = None
    height: int | None = None
    guidance_scale: float = 7.0
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS
    caption_index: int | None = None


@dataclass(frozen=True)
class SampleSettings:
    """Everything a ``sample_prompts`` file sets.

    ``every_n_steps``/``every_n_epochs`` None: not set in the file (the run's ``sample_steps``
    applies). ``pretrain``: make samples once before the first step.
    """

    requests: tuple[SampleRequest, ...]
    scheduler: str = DEFAULT_SCHEDULER
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    pretrain: bool = False
    show_progress_bars: bool = False


def random_caption_count(batch_size: int) -> int:
    """How many random-caption samples a file without prompts gets (EveryDream2's rule)."""
    return min(MAX_RANDOM_CAPTIONS, max(1, batch_size // 2))
