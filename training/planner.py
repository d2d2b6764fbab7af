"""``vram_budget_gb``: the cheapest settings whose memory forecast fits the budget.

The forecast is the dry run's (`training.report.memory_report`): weights of every model on the
training device, gradients and optimizer state of what trains, an EMA kept on the device, and
the activations of the largest bucket's batch measured on fake tensors. Starting from the
user's settings, the planner turns on one saving at a time, cheapest first, until the forecast
fits, and logs each with the forecast it leads to:

1. ``text_encoder_offload`` (a frozen text encoder waits in CPU memory; its outputs are cached);
2. 8-bit optimizer state (``adamw`` -> ``adamw8bit``, ``lion`` -> ``lion8bit``);
3. ``fused_backward_pass`` (no full set of gradients; not with clipping, fp16, several
   processes or optimizers that read every parameter in their step);
4. ``gradient_checkpointing`` (activations rebuilt in backward: about a quarter slower);
5. the batch split into gradient accumulation (``batch_size`` halved and ``grad_accum``
   doubled, the same images per optimizer step), down to batches of one.

Savings the user already has are kept. When even all of them do not fit, a `UserError` says
how much is missing and where the memory goes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from config.errors import UserError
from config.load import LoadedTrainConfig
from models.bundle import ModelBundle
from optimizer.config import OptimizerConfig
from optimizer.fused import FUSABLE
from optimizer.memory import model_memory
from training.activations import step_activations

logger = logging.getLogger(__name__)

EIGHT_BIT = {"adamw": "adamw8bit", "lion": "lion8bit"}
BUDGET_SOURCE = "vram_budget_gb"
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    """The settings the planner may change."""

    text_encoder_offload: bool
    optimizers: dict[str, str | None]  # model -> optimizer name (None: not trained)
    fused_backward_pass: bool
    gradient_checkpointing: bool
    batch_size: int
    grad_accum: int


@dataclass(frozen=True)
class Setting:
    """What the planner needs to know about the run besides the settings it changes."""

    models: ModelBundle
    bucket: tuple[int, int]
    device: torch.device  # where the step runs
    autocast_dtype: torch.dtype | None
    slice_p: dict[str, int]
    ema_bytes: int  # an EMA kept on the training device (0: elsewhere or none)
    offload_possible: bool  # a frozen text encoder with the text-embedding cache
    fused_possible: bool  # no clipping, no fp16, one process
    measured: dict[tuple[bool, int, bool], int] = dataclasses.field(default_factory=dict)

    def activations(self, text_trains: bool, batch_size: int, checkpointing: bool) -> int:
        """The step's activation bytes (measured once per combination)."""
        key = (text_trains, batch_size, checkpointing)
        if key not in self.measured:
            parts = step_activations(
                self.models.unet,
                self.models.text_encoders if text_trains else (),
                batch_size,
                self.bucket,
                checkpointing,
                self.autocast_dtype,
                self.device,
            )
            self.measured[key] = sum(part.total_bytes for part in parts.values())
        return self.measured[key]


def forecast(settings: Settings, setting: Setting) -> dict[str, int]:
    """Bytes on the training device by part, and in all (``total``)."""
    bundle = setting.models
    parts: dict[str, int] = {}
    for name, optimizer in settings.optimizers.items():
        model = bundle.component(name)
        slice_p = setting.slice_p.get(name, 1)
        memory = model_memory(model, optimizer, slice_p, settings.fused_backward_pass)
        offloaded = name == "text_encoder" and settings.text_encoder_offload
        parts[name] = 0 if offloaded else memory["total_bytes"]
    parts["vae"] = model_memory(bundle.vae, None)["total_bytes"]
    parts["ema"] = setting.ema_bytes
    text_trains = settings.optimizers.get("text_encoder") is not None
    parts["activations"] = setting.activations(
        text_trains, settings.batch_size, settings.gradient_checkpointing
    )
    parts["total"] = sum(parts.values())
    return parts


def _savings(settings: Settings, setting: Setting) -> Iterator[tuple[str, Settings]]:
    """Each saving the settings do not have yet, cheapest first: (what it is, new settings)."""
    replace: Callable[..., Settings] = dataclasses.replace
    if setting.offload_possible and not settings.text_encoder_offload:
        yield "text_encoder_offload on", replace(settings, text_encoder_offload=True)
    eight = {n: EIGHT_BIT.get(o, o) if o else o for n, o in settings.optimizers.items()}
    if eight != settings.optimizers:
        pairs = [(n, settings.optimizers[n], eight[n]) for n in eight]
        changed = ", ".join(f"{n} {old} -> {new}" for n, old, new in pairs if old != new)
        yield f"8-bit optimizer state ({changed})", replace(settings, optimizers=eight)
    fusable = all(o is None or o in FUSABLE for o in settings.optimizers.values())
    if setting.fused_possible and fusable and not settings.fused_backward_pass:
        yield "fused_backward_pass on", replace(settings, fused_backward_pass=True)
    if not settings.gradient_checkpointing:
        yield "gradient_checkpointing on", replace(settings, gradient_checkpointing=True)
    if settings.batch_size > 1:
        batch, accum = settings.batch_size // 2, settings.grad_accum * 2
        if batch * accum == settings.batch_size * settings.grad_accum:
            yield (
                f"batch_size {settings.batch_size} -> {batch}, grad_accum "
                f"{settings.grad_accum} -> {accum}",
                replace(settings, batch_size=batch, grad_accum=accum),
            )


def plan(budget_gb: float, settings: Settings, setting: Setting) -> tuple[Settings, list[str]]:
    """The cheapest settings that fit ``budget_gb``, and a line for each saving turned on."""
    budget = int(budget_gb * GIB)
    parts = forecast(settings, setting)
    lines = [f"vram_budget_gb {budget_gb:g}: {_gib(parts['total'])} with the settings as given"]
    while parts["total"] > budget:
        step = next(_savings(settings, setting), None)
        if step is None:
            raise UserError(_too_small(budget_gb, parts))
        what, settings = step
        parts = forecast(settings, setting)
        lines.append(f"vram_budget_gb: {what}: {_gib(parts['total'])}")
    lines.append(f"vram_budget_gb: fits ({_gib(parts['total'])} of {budget_gb:g} GiB)")
    return settings, lines


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


def _too_small(budget_gb: float, parts: dict[str, int]) -> str:
    used = [(name, size) for name, size in parts.items() if name != "total" and size]
    where = ", ".join(f"{name} {_gib(size)}" for name, size in used)
    missing = parts["total"] - int(budget_gb * GIB)
    return (
        f"vram_budget_gb: {budget_gb:g} GiB is too small: with every saving this run can use, "
        f"the forecast is {_gib(parts['total'])} ({where}), {_gib(missing)} more than the "
        "budget; train LoRA adapters (lora_rank), lower the resolution, freeze the text encoder "
        "or raise the budget"
    )


def describe(settings: Settings) -> dict[str, Any]:
    """The planned settings, for the dry run."""
    return dataclasses.asdict(settings)


def settings_of(config: Any, optimizers: dict[str, str | None]) -> Settings:
    """The plannable settings of a train config (``TrainConfig``) and the optimizers."""
    return Settings(
        text_encoder_offload=config.text_encoder_offload,
        optimizers=optimizers,
        fused_backward_pass=config.fused_backward_pass,
        gradient_checkpointing=config.gradient_checkpointing,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
    )


def trains(model: torch.nn.Module) -> bool:
    """Whether any of the model's parameters trains (adapters included)."""
    return any(p.requires_grad for p in model.parameters())


def fit_budget(
    train: LoadedTrainConfig,
    optim: OptimizerConfig,
    models: ModelBundle,
    bucket: tuple[int, int],
    device: torch.device,
    world_size: int,
    ema_bytes: int,
    autocast_dtype: torch.dtype | None,
) -> tuple[LoadedTrainConfig, OptimizerConfig]:
    """The run's train.json and optimizer settings with the savings that ``vram_budget_gb``
    needs (each logged); unchanged when the settings as given fit."""
    c = train.config
    assert c.vram_budget_gb is not None
    by_model = {"unet": optim.unet, "text_encoder": optim.text_encoder}
    optimizers = {
        name: settings.name if trains(models.component(name)) else None
        for name, settings in by_model.items()
    }
    setting = Setting(
        models=models,
        bucket=bucket,
        device=device,
        autocast_dtype=autocast_dtype,
        slice_p={name: settings.value("slice_p") for name, settings in by_model.items()},
        ema_bytes=ema_bytes,
        offload_possible=optimizers["text_encoder"] is None and not c.shuffle_tags,
        fused_possible=c.clip_grad_norm is None
        and autocast_dtype != torch.float16
        and world_size == 1,
    )
    given = settings_of(c, optimizers)
    chosen, lines = plan(c.vram_budget_gb, given, setting)
    for line in lines:
        logger.info("%s", line)
    return _applied(chosen, train, optim)


def _applied(
    chosen: Settings, train: LoadedTrainConfig, optim: OptimizerConfig
) -> tuple[LoadedTrainConfig, OptimizerConfig]:
    """train.json and optimizer settings with the planner's choices, their source recorded."""
    c = train.config
    changes = {
        key: value
        for key, value in dataclasses.asdict(chosen).items()
        if key != "optimizers" and value != getattr(c, key)
    }
    sources = train.sources | dict.fromkeys(changes, BUDGET_SOURCE)
    train = dataclasses.replace(train, config=dataclasses.replace(c, **changes), sources=sources)
    for name in ("unet", "text_encoder"):
        settings, new = getattr(optim, name), chosen.optimizers[name]
        if new is not None and new != settings.name:
            renamed = dataclasses.replace(
                settings,
                settings=dataclasses.replace(settings.settings, optimizer=new),
                sources=settings.sources | {"optimizer": BUDGET_SOURCE},
            )
            optim = dataclasses.replace(optim, **{name: renamed})
    return train, optim
