"""Reading and checking a ``sample_prompts`` file: a ``.txt`` or EveryDream2's ``.json``.

The file is read at configuration time, before any model loads; nothing here imports diffusers.
The .json's keys are declared with ``setting(...)`` like train.json's, so they get the same
checks (types, bounds, finite numbers, text a tokenizer can take) and the same messages.

As EveryDream2 (``utils/sample_generator.py``): prompts get the guidance scales 7, 4 and 1.01
unless the .json sets ``cfgs``; a file without prompts (an empty .txt, a .json without
``samples``) makes samples from min(4, batch_size // 2) random captions of the latest training
batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from config import limits as lim
from config.errors import ConfigError, UserError
from config.fields import InvalidValueError, parse_fields, rule_of, setting
from config.jsonfile import read_json_object, read_text_file
from config.text import check_text, describe
from training.samples.schedulers import scheduler_names, scheduler_problem
from training.samples.settings import (
    DEFAULT_CFGS,
    DEFAULT_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    RANDOM_SEED,
    SampleRequest,
    SampleSettings,
    random_caption_count,
)

logger = logging.getLogger(__name__)

WHAT = "sample prompts"
SIZE_MULTIPLE = 8  # the VAE downsamples by 8
MIN_SIDE = 64
ASPECT_SIZE_MULTIPLE = 64  # sizes chosen from an aspect_ratio, as EveryDream2 and the buckets
_EXTERNAL = "generating samples in an external service is not supported"
_INVOKEAI = "InvokeAI sample lists are not supported"
_IGNORED = "A key of EveryDream2 or its forks."  # keys with status "deprecated"


def _seed(help: str) -> Any:
    return setting(None, help, minimum=RANDOM_SEED, maximum=lim.MAX_SEED)


@dataclass(frozen=True)
class SampleFile:
    """The top level of EveryDream2's sample_prompts.json."""

    samples: Any = setting(None, "The sample images, a list of objects (keys below).")
    seed: int | None = _seed("Seed of every sample; -1 a new random seed each time.")
    cfgs: list[float] | None = setting(
        None,
        "Guidance scales; each sample is drawn once per scale.",
        minimum=0.0,
        maximum=lim.MAX_GUIDANCE_SCALE,
        min_items=1,
    )
    scheduler: str | None = setting(None, "Sampling scheduler.", choices=scheduler_names)
    num_inference_steps: int | None = setting(
        None, "Sampling steps.", minimum=1, maximum=lim.MAX_INFERENCE_STEPS
    )
    resolution: int | None = setting(
        None,
        "Side of square samples, in pixels.",
        minimum=MIN_SIDE,
        maximum=lim.MAX_RESOLUTION,
        multiple_of=SIZE_MULTIPLE,
    )
    show_progress_bars: bool | None = setting(None, "Show the sampling progress bars.")
    generate_samples_every_n_steps: int | None = setting(
        None, "Replaces train.json's sample_steps.", minimum=1, maximum=lim.MAX_STEPS
    )
    generate_samples_every_n_epochs: int | None = setting(
        None, "Also make samples every n epochs.", minimum=1, maximum=lim.MAX_EPOCHS
    )
    generate_pretrain_samples: bool | None = setting(None, "Make samples before the first step.")
    batch_size: Any = setting(
        None,
        _IGNORED,
        status="deprecated",
        note="samples are made one at a time, so each image depends only on its own seed",
    )
    external_gen_enabled: Any = setting(None, _IGNORED, status="deprecated", note=_EXTERNAL)
    external_gen_base_url: Any = setting(None, _IGNORED, status="deprecated", note=_EXTERNAL)
    external_gen_model_save_dir: Any = setting(None, _IGNORED, status="deprecated", note=_EXTERNAL)
    keep_model_after_external_gen: Any = setting(
        None, _IGNORED, status="deprecated", note=_EXTERNAL
    )
    offload_model_for_external_gen: Any = setting(
        None, _IGNORED, status="deprecated", note=_EXTERNAL
    )
    invokeai_info_dicts_json: Any = setting(None, _IGNORED, status="deprecated", note=_INVOKEAI)
    append_invokeai_info_dicts: Any = setting(None, _IGNORED, status="deprecated", note=_INVOKEAI)


@dataclass(frozen=True)
class SampleEntry:
    """One object of ``samples``."""

    prompt: str | None = setting(None, "The prompt (plain text, no weighting).", text="text")
    negative_prompt: str | None = setting(None, "The negative prompt.", text="text")
    seed: int | None = _seed("This sample's seed; -1 a new random seed each time.")
    size: tuple[int, int] | None = setting(
        None,
        "[width, height] in pixels.",
        minimum=MIN_SIDE,
        maximum=lim.MAX_RESOLUTION,
        multiple_of=SIZE_MULTIPLE,
    )
    aspect_ratio: float | None = setting(
        None, "Width / height, at about the default size's area.", minimum=0.25, maximum=4.0
    )
    random_caption: bool | None = setting(
        None, "Use a caption of the latest training batch as the prompt."
    )
    cfg: float | None = setting(
        None, "This sample's guidance scale.", minimum=0.0, maximum=lim.MAX_GUIDANCE_SCALE
    )
    cfgs: list[float] | None = setting(
        None,
        "This sample's guidance scales.",
        minimum=0.0,
        maximum=lim.MAX_GUIDANCE_SCALE,
        min_items=1,
    )


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


def load_sample_settings(
    path: Path, resolution: int, seed: int, *, batch_size: int
) -> SampleSettings:
    """Read and check a ``sample_prompts`` file (``.txt`` or ``.json``).

    ``resolution``, ``seed`` and ``batch_size`` are the run's: the defaults for each sample's
    size and seed, and the number of random-caption samples of a file without prompts.
    Any problem raises `UserError` / `ConfigError` naming the file and the key (or line).
    """
    suffix = path.suffix.lower()
    if suffix == ".txt":
        settings = _load_txt(path, resolution, seed, batch_size)
    elif suffix == ".json":
        settings = _load_json(path, resolution, seed, batch_size)
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


def load_sample_prompts(
    path: Path, resolution: int, seed: int, *, batch_size: int
) -> list[SampleRequest]:
    """The sample images a ``sample_prompts`` file asks for (see `load_sample_settings`)."""
    return list(load_sample_settings(path, resolution, seed, batch_size=batch_size).requests)


def _random_captions(
    path: Path, base: SampleRequest, cfgs: tuple[float, ...], batch_size: int
) -> tuple[SampleRequest, ...]:
    """EveryDream2's samples for a file without prompts: random training captions."""
    count = random_caption_count(batch_size)
    logger.info(
        "%s %s: no prompts; samples use %d random caption(s) of the latest training batch, "
        "as EveryDream2 does",
        WHAT,
        path,
        count,
    )
    return tuple(
        replace(base, caption_index=index, guidance_scale=cfg)
        for index in range(count)
        for cfg in cfgs
    )


def _load_txt(path: Path, resolution: int, seed: int, batch_size: int) -> SampleSettings:
    """One prompt a line; blank lines and ``#`` lines are skipped."""
    side = _default_side(resolution)
    base = SampleRequest(prompt="", seed=seed, width=side, height=side)
    prompts: list[str] = []
    problems: list[str] = []
    for number, line in enumerate(read_text_file(path, WHAT, "a .txt file").splitlines(), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        try:
            check_text(prompt, "text")
        except InvalidValueError as error:
            problems.append(f"{WHAT} {path}: line {number}: {error}")
        prompts.append(prompt)
    if problems:
        raise ConfigError(problems)
    if not prompts:
        return SampleSettings(requests=_random_captions(path, base, DEFAULT_CFGS, batch_size))
    requests = tuple(
        replace(base, prompt=prompt, guidance_scale=cfg)
        for prompt in prompts
        for cfg in DEFAULT_CFGS
    )
    return SampleSettings(requests=requests)


def _log_ignored(data: dict[str, Any], where: str) -> None:
    for f in dataclasses.fields(SampleFile):
        rule = rule_of(f)
        if rule.status == "deprecated" and data.get(f.name) is not None:
            log = logger.info if f.name == "batch_size" else logger.warning
            log("%s: '%s' is ignored: %s", where, f.name, rule.note)


def _load_json(path: Path, resolution: int, seed: int, batch_size: int) -> SampleSettings:
    data = read_json_object(path, WHAT)
    where = f"{WHAT} {path}"
    top, problems = parse_fields(SampleFile, data, where)
    _log_ignored(data, where)
    scheduler = top.get("scheduler", DEFAULT_SCHEDULER)
    missing_package = scheduler_problem(scheduler)
    if missing_package is not None:
        problems.append(f"{where}: scheduler: {missing_package}")
    side = top.get("resolution", _default_side(resolution))
    base = SampleRequest(
        prompt="",
        seed=top.get("seed", seed),
        width=side,
        height=side,
        num_inference_steps=top.get("num_inference_steps", DEFAULT_INFERENCE_STEPS),
    )
    cfgs = tuple(top.get("cfgs", DEFAULT_CFGS))
    samples = top.get("samples")
    if samples is None or samples == []:
        requests = _random_captions(path, base, cfgs, batch_size)
    else:
        requests, sample_problems = _parse_samples(samples, where, base, cfgs)
        problems += sample_problems
    if problems:
        raise ConfigError(problems)
    return SampleSettings(
        requests=requests,
        scheduler=scheduler,
        every_n_steps=top.get("generate_samples_every_n_steps"),
        every_n_epochs=top.get("generate_samples_every_n_epochs"),
        pretrain=top.get("generate_pretrain_samples", False),
        show_progress_bars=top.get("show_progress_bars", False),
    )


def _parse_samples(
    samples: object, where: str, base: SampleRequest, cfgs: tuple[float, ...]
) -> tuple[tuple[SampleRequest, ...], list[str]]:
    """Every entry of ``samples``: one request per guidance scale; every problem."""
    if not isinstance(samples, list):
        return (), [f"{where}: samples: expected a list of samples, got {describe(samples)}"]
    requests: list[SampleRequest] = []
    problems: list[str] = []
    random_captions = 0
    for number, sample in enumerate(samples):
        key = f"samples[{number}]"
        if not isinstance(sample, dict):
            problems.append(
                f'{where}: {key}: expected an object like {{"prompt": "..."}}, '
                f"got {describe(sample)}"
            )
            continue
        values, sample_problems = parse_fields(SampleEntry, sample, where, key_prefix=f"{key}.")
        sample_problems += [f"{where}: {key}: {p}" for p in _conflicts(sample)]
        if sample_problems:
            problems += sample_problems
            continue
        request = _request(values, base)
        if values.get("random_caption", False):
            request = replace(request, caption_index=random_captions)
            random_captions += 1
        scales = (values["cfg"],) if "cfg" in values else tuple(values.get("cfgs", cfgs))
        requests += [replace(request, guidance_scale=scale) for scale in scales]
    return tuple(requests), problems


def _conflicts(sample: dict[str, Any]) -> list[str]:
    """Keys of one sample that contradict each other (a null key counts as not given)."""

    def given(key: str) -> bool:
        return sample.get(key) is not None

    problems = []
    if given("size") and given("aspect_ratio"):
        problems.append("give either 'size' or 'aspect_ratio', not both")
    random_caption = sample.get("random_caption") is True
    if random_caption and given("prompt"):
        problems.append("give either 'prompt' or 'random_caption': true, not both")
    if not random_caption and not given("prompt"):
        problems.append("missing 'prompt' (or 'random_caption': true)")
    if given("cfg") and given("cfgs"):
        problems.append("give either 'cfg' or 'cfgs', not both")
    return problems


def _request(values: dict[str, Any], base: SampleRequest) -> SampleRequest:
    """One sample's request from its checked values and the file's defaults."""
    assert base.width is not None and base.height is not None
    width, height = base.width, base.height
    if "size" in values:
        width, height = values["size"]
    elif "aspect_ratio" in values:
        width, height = size_for_aspect_ratio(values["aspect_ratio"], base.width)
    return replace(
        base,
        prompt=values.get("prompt", base.prompt),
        negative_prompt=values.get("negative_prompt", base.negative_prompt),
        seed=values.get("seed", base.seed),
        width=width,
        height=height,
    )
