"""Making sample images with the live model.

Images are made with the modules being trained, without copying their weights, and leave
training untouched: the global RNG state, train/eval modes and ``requires_grad`` flags are as
they were afterwards. diffusers is imported only here, when images are made.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from training.samples.schedulers import is_zero_terminal_snr, make_inference_scheduler
from training.samples.settings import DEFAULT_SCHEDULER, RANDOM_SEED, SampleRequest
from training.text_cache import text_encoders_on

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL.Image import Image

    from models.bundle import ModelBundle

logger = logging.getLogger(__name__)

# Guidance rescale for zero-terminal-SNR models (Lin et al. 2023, section 3.4), as EveryDream2.
ZERO_SNR_GUIDANCE_RESCALE = 0.7


@contextlib.contextmanager
def _sampling_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for ``modules`` inside; every submodule's mode and ``requires_grad`` restored."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a CUDA device that supports it, fp16 on other CUDA devices, else none."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _forked_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _prompt_for(request: SampleRequest, captions: Sequence[str]) -> str:
    if request.caption_index is None:
        return request.prompt
    if not captions:
        logger.warning("sample with random_caption: no training captions given, empty prompt used")
        return ""
    return captions[request.caption_index % len(captions)]


def _seed_for(request: SampleRequest) -> int:
    if request.seed == RANDOM_SEED:
        return secrets.randbelow(2**31)
    return request.seed


@dataclass(frozen=True)
class _Drawing:
    """How every image of one call is drawn."""

    pipe: DiffusionPipeline
    bundle: ModelBundle
    scheduler_name: str
    clip_skip: int
    guidance_rescale: float


def _build_pipeline(
    bundle: ModelBundle, scheduler_name: str, noise_scheduler_config: Mapping[str, Any]
) -> DiffusionPipeline:
    """A pipeline around the bundle's own modules (no copy of their weights), with the
    inference scheduler ``scheduler_name`` (`models.pipeline_folder.pipeline_of`)."""
    from models.pipeline_folder import pipeline_of

    return pipeline_of(bundle, make_inference_scheduler(scheduler_name, noise_scheduler_config))


def _prompt_kwargs(drawing: _Drawing, prompt: str, negative_prompt: str) -> dict[str, Any]:
    """The pipeline's prompt arguments, encoded as training encodes captions (``clip_skip``);
    SDXL's pooled embeddings too (its size conditioning is the pipeline's: the image's size,
    no crop)."""
    from training.step import CaptionTokenizer, PromptEncoder

    bundle = drawing.bundle
    ids = CaptionTokenizer.of(bundle)([prompt, negative_prompt])
    conditioning = PromptEncoder.of(bundle, drawing.clip_skip)(ids)
    kwargs = {
        "prompt_embeds": conditioning.embeds[0:1],
        "negative_prompt_embeds": conditioning.embeds[1:2],
    }
    if conditioning.pooled is not None:
        kwargs["pooled_prompt_embeds"] = conditioning.pooled[0:1]
        kwargs["negative_pooled_prompt_embeds"] = conditioning.pooled[1:2]
    return kwargs


def _make_image(drawing: _Drawing, request: SampleRequest, prompt: str, seed: int) -> Image:
    # A CPU generator: the same seed gives the same starting noise on any device.
    generator = torch.Generator("cpu").manual_seed(seed)
    sdxl = drawing.bundle.text_encoder_2 is not None
    output = drawing.pipe(
        **_prompt_kwargs(drawing, prompt, request.negative_prompt),
        width=request.width,
        height=request.height,
        guidance_scale=request.guidance_scale,
        guidance_rescale=drawing.guidance_rescale,
        num_inference_steps=request.num_inference_steps,
        generator=generator,
        output_type="latent" if sdxl else "pil",
    )
    if sdxl:
        return _decode_in_fp32(drawing, output.images)
    return output.images[0]


def _decode_in_fp32(drawing: _Drawing, latents: torch.Tensor) -> Image:
    """SDXL's VAE overflows in fp16 (NaNs, black images): its decode runs in fp32 whatever the
    sampling autocast, as diffusers' SDXL pipeline upcasts it (``force_upcast``)."""
    vae = drawing.bundle.vae
    with torch.autocast(latents.device.type, enabled=False):
        pixels = vae.decode(latents.float() / vae.config.scaling_factor).sample
    return drawing.pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def _describe(
    drawing: _Drawing, request: SampleRequest, prompt: str, seed: int, image: Image
) -> str:
    lines = [
        prompt,
        f"negative_prompt: {request.negative_prompt}",
        f"seed: {seed}",
        f"size: {image.width}x{image.height}",
        f"guidance_scale: {request.guidance_scale:g}",
        f"guidance_rescale: {drawing.guidance_rescale:g}",
        f"num_inference_steps: {request.num_inference_steps}",
        f"scheduler: {drawing.scheduler_name}",
        f"clip_skip: {drawing.clip_skip}",
    ]
    return "\n".join(lines) + "\n"


ImageSink = Callable[[str, np.ndarray, int], None]
"""Where a sample image also goes: ``(tag, image as an HWC uint8 array, step)``."""


@dataclass(frozen=True)
class SamplingModel:
    """The model samples are drawn with, and how it runs.

    The modules must be on ``device``. ``autocast`` makes the models' autocast (None: bf16/fp16
    on CUDA, none elsewhere); ``noise_scheduler_config`` is the training noise scheduler's
    (None: the bundle's): a zero-terminal-SNR one samples with trailing timesteps and guidance
    rescale 0.7.
    """

    bundle: ModelBundle
    device: torch.device
    clip_skip: int = 0
    noise_scheduler_config: Mapping[str, Any] | None = None
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None


@dataclass(frozen=True)
class SampleBatch:
    """What to draw and where: one image per request at ``step`` into ``out_dir``, named
    ``step-{step:06d}-{index:02d}{name_suffix}.png``; ``random_caption`` requests draw from
    ``captions``."""

    requests: Sequence[SampleRequest]
    out_dir: Path | None  # None: drawn, not written (a sharded model's other processes)
    step: int
    scheduler_name: str = DEFAULT_SCHEDULER
    captions: Sequence[str] = ()
    name_suffix: str = ""
    show_progress_bars: bool = False


def generate_samples(
    model: SamplingModel, batch: SampleBatch, on_image: ImageSink | None = None
) -> list[Path]:
    """Make one image per request with the model being trained; return the PNG paths.

    Each PNG gets a ``.txt`` beside it (the prompt, then the settings used); ``on_image`` also
    receives each image, tagged ``samples/{index}{name_suffix}``.

    Training is unaffected: the global torch RNG state (CPU and the device), every module's
    train/eval mode and every parameter's ``requires_grad`` are as they were before.
    """
    if not batch.requests:
        return []
    drawing = _drawing(model, batch.scheduler_name)
    drawing.pipe.set_progress_bar_config(disable=not batch.show_progress_bars, leave=False)
    suffix, out_dir = batch.name_suffix, batch.out_dir
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "making %d sample images%s at step %d in %s",
            len(batch.requests),
            f" ({suffix})" if suffix else "",
            batch.step,
            out_dir,
        )
    paths: list[Path] = []
    with _sampling_context(model):
        for index, request in enumerate(batch.requests):
            name = f"step-{batch.step:06d}-{index:02d}{suffix}.png"
            path = None if out_dir is None else out_dir / name
            image = _save_image(drawing, request, batch.captions, path)
            if on_image is not None:
                on_image(f"samples/{index}{suffix}", np.asarray(image), batch.step)
            if path is not None:
                paths.append(path)
    return paths


def _drawing(model: SamplingModel, scheduler_name: str) -> _Drawing:
    """The pipeline around the bundle's modules and what each image is drawn with."""
    bundle = model.bundle
    config = model.noise_scheduler_config
    config = bundle.noise_scheduler.config if config is None else config
    return _Drawing(
        pipe=_build_pipeline(bundle, scheduler_name, config),
        bundle=bundle,
        scheduler_name=scheduler_name,
        clip_skip=model.clip_skip,
        guidance_rescale=ZERO_SNR_GUIDANCE_RESCALE if is_zero_terminal_snr(config) else 0.0,
    )


@contextlib.contextmanager
def _sampling_context(model: SamplingModel) -> Iterator[None]:
    """Eval mode, a forked RNG, no gradients and the autocast, all undone afterwards."""
    bundle = model.bundle
    modules = [bundle.unet, *bundle.text_encoders, bundle.vae]
    autocast = _autocast(model.device) if model.autocast is None else model.autocast()
    with (
        text_encoders_on(bundle.text_encoders, model.device),
        _sampling_mode(modules),
        torch.random.fork_rng(devices=_forked_devices(model.device)),
        torch.no_grad(),
        autocast,
    ):
        yield


def _save_image(
    drawing: _Drawing, request: SampleRequest, captions: Sequence[str], path: Path | None
) -> Image:
    """Draw one request and write its PNG and the ``.txt`` that describes it (``path`` None:
    drawn, not written)."""
    prompt = _prompt_for(request, captions)
    seed = _seed_for(request)
    image = _make_image(drawing, request, prompt, seed)
    if path is None:
        return image
    image.save(path)
    path.with_suffix(".txt").write_text(
        _describe(drawing, request, prompt, seed, image), encoding="utf-8"
    )
    return image
