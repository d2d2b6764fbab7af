"""Sample images during training: reading ``sample_prompts`` and making images with the live model.

``sample_prompts`` is a ``.txt`` (one prompt a line) or a ``.json`` in EveryDream2's
``sample_prompts.json`` format. It is read and checked at configuration time, before any model
is loaded (this module imports diffusers only when images are made). Images are made with the
modules being trained, without copying their weights, and leave training untouched: the global
RNG state, train/eval modes and ``requires_grad`` flags are as they were afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from config.errors import ConfigError, UserError, did_you_mean
from config.jsonfile import read_json_object

if TYPE_CHECKING:
    from diffusers import SchedulerMixin, StableDiffusionPipeline
    from PIL.Image import Image
    from torch.utils.tensorboard import SummaryWriter

    from models.bundle import ModelBundle

logger = logging.getLogger(__name__)

T = TypeVar("T")

WHAT = "sample prompts"
DEFAULT_SCHEDULER = "ddim"
RANDOM_SEED = -1  # EveryDream2: a new random seed each time samples are made
MAX_SEED = 2**63 - 1
SIZE_MULTIPLE = 8  # the VAE downsamples by 8
ASPECT_SIZE_MULTIPLE = 64  # sizes chosen from an aspect_ratio, as EveryDream2 and the buckets


@dataclass(frozen=True)
class SampleRequest:
    """One sample image: what to draw and how.

    ``width``/``height`` None: the model's native size (``load_sample_prompts`` always fills
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
    num_inference_steps: int = 30
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


# --- inference schedulers ------------------------------------------------------------------


@dataclass(frozen=True)
class _SchedulerChoice:
    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    requires: str | None = None  # a Python package diffusers needs for this scheduler


_DPMPP = {"algorithm_type": "dpmsolver++"}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++"}
_KARRAS = {"use_karras_sigmas": True}
_SINGLESTEP = {"lower_order_final": True}  # what diffusers switches to anyway, without a warning

# EveryDream2's scheduler names and what they are in diffusers; "dpm++" is "dpm++_2m".
SCHEDULERS: dict[str, _SchedulerChoice] = {
    "ddim": _SchedulerChoice("DDIMScheduler"),
    "ddpm": _SchedulerChoice("DDPMScheduler"),
    "pndm": _SchedulerChoice("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": _SchedulerChoice("EulerDiscreteScheduler"),
    "euler_a": _SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "heun": _SchedulerChoice("HeunDiscreteScheduler"),
    "kdpm2": _SchedulerChoice("KDPM2AncestralDiscreteScheduler"),
    "unipc": _SchedulerChoice("UniPCMultistepScheduler"),
    "dpm++": _SchedulerChoice("DPMSolverMultistepScheduler", _DPMPP),
    "dpm++_2m": _SchedulerChoice("DPMSolverMultistepScheduler", _DPMPP),
    "dpm++_2m_k": _SchedulerChoice("DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS}),
    "dpm++_2s": _SchedulerChoice("DPMSolverSinglestepScheduler", _SINGLESTEP),
    "dpm++_2s_k": _SchedulerChoice("DPMSolverSinglestepScheduler", {**_SINGLESTEP, **_KARRAS}),
    "dpm++_2m_sde": _SchedulerChoice("DPMSolverMultistepScheduler", _DPMPP_SDE),
    "dpm++_2m_sde_k": _SchedulerChoice("DPMSolverMultistepScheduler", {**_DPMPP_SDE, **_KARRAS}),
    "dpm++_sde": _SchedulerChoice("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, "torchsde"),
    "dpm++_sde_k": _SchedulerChoice(
        "DPMSolverSDEScheduler", {"noise_sampler_seed": 0, **_KARRAS}, "torchsde"
    ),
    "lms": _SchedulerChoice("LMSDiscreteScheduler", {}, "scipy"),
}


def scheduler_problem(name: object) -> str | None:
    """Why ``name`` is not a usable sample scheduler here, or None when it is."""
    if not isinstance(name, str):
        return f"expected a scheduler name (a string), got {name!r}"
    choice = SCHEDULERS.get(name)
    if choice is None:
        return (
            f"unknown scheduler '{name}'{did_you_mean(name, SCHEDULERS)}; "
            f"allowed: {', '.join(SCHEDULERS)}"
        )
    if choice.requires is not None and importlib.util.find_spec(choice.requires) is None:
        usable = [n for n, c in SCHEDULERS.items() if c.requires is None]
        return (
            f"scheduler '{name}' needs the Python package '{choice.requires}', which is not "
            f"installed (pip install {choice.requires}); or use one of: {', '.join(usable)}"
        )
    return None


def make_inference_scheduler(name: str, noise_scheduler_config: Any) -> SchedulerMixin:
    """The sampling scheduler ``name`` built from the model's noise-scheduler config.

    A model trained with zero-terminal SNR (``rescale_betas_zero_snr``) samples with
    ``timestep_spacing="trailing"``, so that the last step starts from pure noise.
    """
    problem = scheduler_problem(name)
    if problem is not None:
        raise UserError(f"sample scheduler: {problem}")
    choice = SCHEDULERS[name]
    diffusers = importlib.import_module("diffusers")
    options = dict(choice.options)
    if noise_scheduler_config.get("rescale_betas_zero_snr", False):
        options["timestep_spacing"] = "trailing"
    return getattr(diffusers, choice.class_name).from_config(noise_scheduler_config, **options)


# --- reading sample_prompts ----------------------------------------------------------------

TOP_LEVEL_KEYS = (
    "samples",
    "seed",
    "cfgs",
    "scheduler",
    "num_inference_steps",
    "resolution",
    "show_progress_bars",
    "generate_samples_every_n_steps",
    "generate_samples_every_n_epochs",
    "generate_pretrain_samples",
)
# Keys of EveryDream2 (and its forks) that are accepted and do nothing here, with the reason.
IGNORED_TOP_LEVEL_KEYS: dict[str, str] = {
    "batch_size": "samples are made one at a time, so each image depends only on its own seed",
    "external_gen_enabled": "generating samples in an external service is not supported",
    "external_gen_base_url": "generating samples in an external service is not supported",
    "external_gen_model_save_dir": "generating samples in an external service is not supported",
    "keep_model_after_external_gen": "generating samples in an external service is not supported",
    "offload_model_for_external_gen": "generating samples in an external service is not supported",
    "invokeai_info_dicts_json": "InvokeAI sample lists are not supported",
    "append_invokeai_info_dicts": "InvokeAI sample lists are not supported",
}
SAMPLE_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "size",
    "aspect_ratio",
    "random_caption",
    "cfg",
    "cfgs",
)


class _Problems:
    """Collects ``<file>: <key>: <what is wrong>`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{WHAT} {self.path}: {key}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(problems: _Problems, key: str, value: object, minimum: int) -> int | None:
    if not _is_int(value):
        problems.add(key, f"expected a whole number, got {value!r}")
        return None
    if value < minimum:
        problems.add(key, f"must be at least {minimum}, got {value}")
        return None
    return value


def _check_bool(problems: _Problems, key: str, value: object) -> bool | None:
    if not isinstance(value, bool):
        problems.add(key, f"expected true or false, got {value!r}")
        return None
    return value


def _check_str(problems: _Problems, key: str, value: object) -> str | None:
    if not isinstance(value, str):
        problems.add(key, f"expected a string, got {value!r}")
        return None
    return value


def _check_seed(problems: _Problems, key: str, value: object) -> int | None:
    if not _is_int(value) or not (value == RANDOM_SEED or 0 <= value <= MAX_SEED):
        problems.add(
            key, f"expected a whole number from 0 to 2^63-1, or -1 (random), got {value!r}"
        )
        return None
    return value


def _check_side(problems: _Problems, key: str, value: object) -> int | None:
    if not _is_int(value) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE != 0:
        problems.add(key, f"expected a multiple of {SIZE_MULTIPLE} (pixels), got {value!r}")
        return None
    return value


def _check_size(problems: _Problems, key: str, value: object) -> tuple[int, int] | None:
    if not isinstance(value, list) or len(value) != 2:
        problems.add(key, f"expected [width, height], got {value!r}")
        return None
    width = _check_side(problems, f"{key}[0]", value[0])
    height = _check_side(problems, f"{key}[1]", value[1])
    return None if width is None or height is None else (width, height)


def _check_cfgs(problems: _Problems, key: str, value: object) -> tuple[float, ...] | None:
    if not isinstance(value, list) or not value:
        problems.add(
            key, f"expected a non-empty list of guidance scales, e.g. [7, 4], got {value!r}"
        )
        return None
    if not all(_is_number(v) and v >= 0 for v in value):
        problems.add(key, f"each guidance scale must be a number >= 0, got {value!r}")
        return None
    return tuple(float(v) for v in value)


def _check_cfg(problems: _Problems, key: str, value: object) -> tuple[float, ...] | None:
    if not _is_number(value) or value < 0:
        problems.add(key, f"expected a guidance scale (a number >= 0), got {value!r}")
        return None
    return (float(value),)


def _check_aspect(problems: _Problems, key: str, value: object) -> float | None:
    if not _is_number(value) or not 0.25 <= value <= 4.0:
        problems.add(key, f"expected width/height as a number from 0.25 to 4, got {value!r}")
        return None
    return float(value)


def size_for_aspect_ratio(aspect_ratio: float, resolution: int) -> tuple[int, int]:
    """About ``resolution``² pixels at ``aspect_ratio`` (width/height), sides multiples of 64."""
    root = math.sqrt(aspect_ratio)

    def side(length: float) -> int:
        return max(
            ASPECT_SIZE_MULTIPLE, round(length / ASPECT_SIZE_MULTIPLE) * ASPECT_SIZE_MULTIPLE
        )

    return side(resolution * root), side(resolution / root)


def _default_side(resolution: int) -> int:
    """The training resolution as a sample side: rounded down to a multiple of 8."""
    return max(SIZE_MULTIPLE, resolution // SIZE_MULTIPLE * SIZE_MULTIPLE)


def load_sample_settings(path: Path, resolution: int, seed: int) -> SampleSettings:
    """Read and check a ``sample_prompts`` file (``.txt`` or ``.json``).

    ``resolution`` and ``seed`` are the run's: the defaults for each sample's size and seed.
    Any problem raises `UserError` / `ConfigError` naming the file and the key (or line).
    """
    suffix = path.suffix.lower()
    if suffix == ".txt":
        settings = _load_txt(path, resolution, seed)
    elif suffix == ".json":
        settings = _load_json(path, resolution, seed)
    else:
        raise UserError(
            f"{WHAT} {path}: unknown file type '{path.suffix}'; expected a .txt (one prompt a "
            "line) or a .json (EveryDream2's sample_prompts.json format)"
        )
    logger.info(
        "%s %s: %d sample images, scheduler %s",
        WHAT,
        path,
        len(settings.requests),
        settings.scheduler,
    )
    return settings


def load_sample_prompts(path: Path, resolution: int, seed: int) -> list[SampleRequest]:
    """The sample images a ``sample_prompts`` file asks for (see `load_sample_settings`)."""
    return list(load_sample_settings(path, resolution, seed).requests)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{WHAT} {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{WHAT} {path}: is a folder, expected a .txt file") from None
    except OSError as exc:
        raise UserError(f"{WHAT} {path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{WHAT} {path}: line {line}: not UTF-8 text ({exc.reason})") from None


def _load_txt(path: Path, resolution: int, seed: int) -> SampleSettings:
    side = _default_side(resolution)
    prompts = [line.strip() for line in _read_text(path).splitlines()]
    requests = tuple(
        SampleRequest(prompt=p, seed=seed, width=side, height=side)
        for p in prompts
        if p and not p.startswith("#")
    )
    if not requests:
        raise UserError(
            f"{WHAT} {path}: no prompts (write one prompt a line; blank lines and lines "
            "starting with # are skipped)"
        )
    return SampleSettings(requests=requests)


def _get(
    problems: _Problems,
    data: dict[str, Any],
    key: str,
    check: Callable[[_Problems, str, object], T | None],
    default: T,
    where: str = "",
) -> T:
    """``data[key]`` checked by ``check``; ``default`` when absent or invalid (then a problem
    naming ``where.key`` is recorded, so that every problem of the file is reported at once)."""
    if key not in data:
        return default
    value = check(problems, f"{where}.{key}" if where else key, data[key])
    return default if value is None else value


def _check_positive(problems: _Problems, key: str, value: object) -> int | None:
    return _check_int(problems, key, value, 1)


def _check_scheduler(problems: _Problems, key: str, value: object) -> str | None:
    problem = scheduler_problem(value)
    if problem is not None:
        problems.add(key, problem)
        return None
    assert isinstance(value, str)
    return value


def _load_json(path: Path, resolution: int, seed: int) -> SampleSettings:
    data = read_json_object(path, WHAT)
    problems = _Problems(path)
    for key in data:
        if key in IGNORED_TOP_LEVEL_KEYS:
            log = logger.info if key == "batch_size" else logger.warning
            log("%s %s: '%s' is ignored: %s", WHAT, path, key, IGNORED_TOP_LEVEL_KEYS[key])
        elif key not in TOP_LEVEL_KEYS:
            known = (*TOP_LEVEL_KEYS, *IGNORED_TOP_LEVEL_KEYS)
            problems.add(
                key,
                f"unknown key{did_you_mean(key, known)}; allowed: {', '.join(TOP_LEVEL_KEYS)}",
            )

    defaults = SampleRequest(prompt="")
    side = _get(problems, data, "resolution", _check_side, _default_side(resolution))
    base = SampleRequest(
        prompt="",
        seed=_get(problems, data, "seed", _check_seed, seed),
        width=side,
        height=side,
        num_inference_steps=_get(
            problems, data, "num_inference_steps", _check_positive, defaults.num_inference_steps
        ),
    )
    cfgs = _get(problems, data, "cfgs", _check_cfgs, (defaults.guidance_scale,))
    no_interval: int | None = None
    settings = SampleSettings(
        requests=(),
        scheduler=_get(problems, data, "scheduler", _check_scheduler, DEFAULT_SCHEDULER),
        every_n_steps=_get(
            problems, data, "generate_samples_every_n_steps", _check_positive, no_interval
        ),
        every_n_epochs=_get(
            problems, data, "generate_samples_every_n_epochs", _check_positive, no_interval
        ),
        pretrain=_get(problems, data, "generate_pretrain_samples", _check_bool, False),
        show_progress_bars=_get(problems, data, "show_progress_bars", _check_bool, False),
    )
    samples = data.get("samples")
    if samples is None or samples == []:
        problems.add(
            "samples",
            'no prompts: add a list of samples, e.g. "samples": [{"prompt": "a photo of ted"}] '
            '(use {"random_caption": true} for a caption from the training data)',
        )
        samples = []
    elif not isinstance(samples, list):
        problems.add("samples", f"expected a list of samples, got {samples!r}")
        samples = []

    requests: list[SampleRequest] = []
    random_captions = 0
    for number, sample in enumerate(samples):
        parsed = _parse_sample(problems, f"samples[{number}]", sample, base, cfgs)
        if parsed is None:
            continue
        wants_caption, expanded = parsed
        if wants_caption:
            expanded = [replace(r, caption_index=random_captions) for r in expanded]
            random_captions += 1
        requests.extend(expanded)
    problems.raise_if_any()
    return replace(settings, requests=tuple(requests))


def _sample_size(
    problems: _Problems, key: str, sample: dict[str, Any], base: SampleRequest
) -> tuple[int, int]:
    """``size``, or a size from ``aspect_ratio`` at the default size's area, or the default."""
    assert base.width is not None and base.height is not None
    default = (base.width, base.height)
    if "size" in sample and "aspect_ratio" in sample:
        problems.add(key, "give either 'size' or 'aspect_ratio', not both")
        return default
    if "aspect_ratio" in sample:
        aspect = _get(problems, sample, "aspect_ratio", _check_aspect, None, key)
        return default if aspect is None else size_for_aspect_ratio(aspect, base.width)
    return _get(problems, sample, "size", _check_size, default, key)


def _parse_sample(
    problems: _Problems,
    key: str,
    sample: object,
    base: SampleRequest,
    cfgs: tuple[float, ...],
) -> tuple[bool, list[SampleRequest]] | None:
    """One entry of ``samples``: (wants a random caption, one request per guidance scale)."""
    if not isinstance(sample, dict):
        problems.add(key, f'expected an object like {{"prompt": "..."}}, got {sample!r}')
        return None
    before = len(problems.lines)
    for name in sample:
        if name not in SAMPLE_KEYS:
            problems.add(
                f"{key}.{name}",
                f"unknown key{did_you_mean(name, SAMPLE_KEYS)}; allowed: {', '.join(SAMPLE_KEYS)}",
            )
    random_caption = _get(problems, sample, "random_caption", _check_bool, False, key)
    if random_caption and "prompt" in sample:
        problems.add(key, "give either 'prompt' or 'random_caption': true, not both")
    if not random_caption and "prompt" not in sample:
        problems.add(key, "missing 'prompt' (or 'random_caption': true)")
    if "cfg" in sample and "cfgs" in sample:
        problems.add(key, "give either 'cfg' or 'cfgs', not both")
    elif "cfg" in sample:
        cfgs = _get(problems, sample, "cfg", _check_cfg, cfgs, key)
    else:
        cfgs = _get(problems, sample, "cfgs", _check_cfgs, cfgs, key)
    width, height = _sample_size(problems, key, sample, base)
    request = SampleRequest(
        prompt=_get(problems, sample, "prompt", _check_str, base.prompt, key),
        negative_prompt=_get(problems, sample, "negative_prompt", _check_str, "", key),
        seed=_get(problems, sample, "seed", _check_seed, base.seed, key),
        width=width,
        height=height,
        num_inference_steps=base.num_inference_steps,
    )
    if len(problems.lines) > before:
        return None
    return random_caption, [replace(request, guidance_scale=cfg) for cfg in cfgs]


# --- making images -------------------------------------------------------------------------


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


def _build_pipeline(bundle: ModelBundle, scheduler_name: str) -> StableDiffusionPipeline:
    """A pipeline around the bundle's own modules (no copy of their weights)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=make_inference_scheduler(scheduler_name, bundle.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _make_image(
    pipe: StableDiffusionPipeline,
    bundle: ModelBundle,
    request: SampleRequest,
    prompt: str,
    seed: int,
    clip_skip: int,
) -> Image:
    from models.text import encode_prompts, tokenize

    input_ids = tokenize(bundle.tokenizer, [prompt, request.negative_prompt])
    embeds = encode_prompts(bundle.text_encoder, input_ids, clip_skip)
    # A CPU generator: the same seed gives the same starting noise on any device.
    generator = torch.Generator("cpu").manual_seed(seed)
    output = pipe(
        prompt_embeds=embeds[0:1],
        negative_prompt_embeds=embeds[1:2],
        width=request.width,
        height=request.height,
        guidance_scale=request.guidance_scale,
        num_inference_steps=request.num_inference_steps,
        generator=generator,
        output_type="pil",
    )
    return output.images[0]


def _describe(
    request: SampleRequest, prompt: str, seed: int, image: Image, scheduler: str, clip_skip: int
) -> str:
    lines = [
        prompt,
        f"negative_prompt: {request.negative_prompt}",
        f"seed: {seed}",
        f"size: {image.width}x{image.height}",
        f"guidance_scale: {request.guidance_scale:g}",
        f"num_inference_steps: {request.num_inference_steps}",
        f"scheduler: {scheduler}",
        f"clip_skip: {clip_skip}",
    ]
    return "\n".join(lines) + "\n"


def generate_samples(
    bundle: ModelBundle,
    requests: Sequence[SampleRequest],
    clip_skip: int,
    device: torch.device,
    out_dir: Path,
    step: int,
    writer: SummaryWriter | None = None,
    scheduler_name: str = DEFAULT_SCHEDULER,
    *,
    captions: Sequence[str] = (),
    show_progress_bars: bool = False,
) -> list[Path]:
    """Make one image per request with the model being trained; return the PNG paths.

    Each image is ``out_dir/step-{step:06d}-{index:02d}.png`` with a ``.txt`` beside it (the
    prompt on the first line, then the settings used) and, with a ``writer``, the TensorBoard
    image ``samples/{index}`` at ``step``. The bundle's modules must already be on ``device``.
    ``captions`` are the training captions that ``random_caption`` samples draw from.

    Training is unaffected: the global torch RNG state (CPU and ``device``), every module's
    train/eval mode and every parameter's ``requires_grad`` are as they were before.
    """
    if not requests:
        return []
    pipe = _build_pipeline(bundle, scheduler_name)
    pipe.set_progress_bar_config(disable=not show_progress_bars, leave=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("making %d sample images at step %d in %s", len(requests), step, out_dir)
    paths: list[Path] = []
    modules = [bundle.unet, bundle.text_encoder, bundle.vae]
    with (
        _sampling_mode(modules),
        torch.random.fork_rng(devices=_forked_devices(device)),
        torch.no_grad(),
        _autocast(device),
    ):
        for index, request in enumerate(requests):
            prompt = _prompt_for(request, captions)
            seed = _seed_for(request)
            image = _make_image(pipe, bundle, request, prompt, seed, clip_skip)
            path = out_dir / f"step-{step:06d}-{index:02d}.png"
            image.save(path)
            description = _describe(request, prompt, seed, image, scheduler_name, clip_skip)
            path.with_suffix(".txt").write_text(description, encoding="utf-8")
            if writer is not None:
                writer.add_image(f"samples/{index}", np.asarray(image), step, dataformats="HWC")
            paths.append(path)
    if writer is not None:
        writer.flush()
    return paths
