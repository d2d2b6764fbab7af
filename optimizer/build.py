"""Turning an `OptimizerConfig` into frozen text-encoder parts, optimizers and schedulers."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from config.errors import ConfigError, UserError
from models import ModelBundle, text_encoder_parts
from models.text import sdxl_unused_final_layers
from optimizer.config import ModelOptimizer, OptimizerConfig
from optimizer.freezing import FreezePlan, count_parameters, freeze, frozen_modules, plan_freezing
from optimizer.fused import FUSABLE, FusedBackward
from optimizer.registry import OPTIMIZERS, build_optimizer, constructor_kwargs, optimizer_class
from optimizer.schedule_free import has_eval_mode
from optimizer.schedulers import ScheduleLength, build_scheduler, schedule_length

logger = logging.getLogger(__name__)


@dataclass
class ModelTraining:
    """What trains one model: its optimizer, its scheduler and how they were built."""

    model_name: str  # "unet" or "text_encoder"
    settings: ModelOptimizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kwargs: dict[str, Any]
    length: ScheduleLength
    trainable_parameters: int

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass(frozen=True)
class FreezeReport:
    """The text encoder's freezing as applied (the dry run's ``text_encoder_freezing``)."""

    plan: FreezePlan
    trainable_parameters: int
    frozen_parameters: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.plan.num_layers,
            "frozen_layers": list(self.plan.frozen_layers),
            "embeddings_frozen": self.plan.embeddings_frozen,
            "final_layer_norm_frozen": self.plan.final_layer_norm_frozen,
            "trainable_parameters": self.trainable_parameters,
            "frozen_parameters": self.frozen_parameters,
        }


def freeze_plan(config: OptimizerConfig, num_layers: int) -> FreezePlan:
    """The freezing plan for an encoder of ``num_layers`` layers, or a ConfigError."""
    plan, problems = plan_freezing(config.text_encoder_freezing, num_layers)
    if plan is None:
        raise ConfigError([config.where(f"text_encoder_freezing.{p}") for p in problems])
    return plan


def apply_text_encoder_freezing(
    config: OptimizerConfig,
    text_encoder: torch.nn.Module,
    train_text_encoder: bool,
    unused_final_layers: int = 0,
    final_layer_norm_unused: bool = False,
) -> FreezeReport:
    """Freeze what optimizer.json says (everything when the text encoder is not trained).

    ``unused_final_layers``: layers at the end whose output is never used (``clip_skip`` n
    skips n-1 of them); they get no gradient, so they are frozen too, and so is the final layer
    norm when ``final_layer_norm_unused`` (SDXL's first encoder).
    """
    embeddings, layers, final_norm = text_encoder_parts(text_encoder)
    plan = freeze_plan(config, len(layers))
    if final_layer_norm_unused:
        plan = dataclasses.replace(plan, final_layer_norm_frozen=True)
    if unused_final_layers > 0:
        unused = range(len(layers) - unused_final_layers, len(layers))
        plan = dataclasses.replace(
            plan, frozen_layers=tuple(sorted(set(plan.frozen_layers) | set(unused)))
        )
    if train_text_encoder:
        freeze(frozen_modules(plan, embeddings, layers, final_norm))
    else:
        text_encoder.requires_grad_(False)
    trainable, frozen = count_parameters(text_encoder)
    return FreezeReport(plan, trainable, frozen)


def freeze_text_encoders(
    config: OptimizerConfig, bundle: ModelBundle, train_text_encoder: bool, clip_skip: int
) -> tuple[FreezeReport, ...]:
    """`apply_text_encoder_freezing` for each text encoder, each counting its own layers (SDXL:
    both, with what SDXL leaves unused: the first encoder's layers after the one ``clip_skip``
    picks and its final layer norm, `models.text`)."""
    if bundle.text_encoder_2 is None:
        unused = (max(0, clip_skip - 1),)
        norms = (False,)
    else:
        unused = sdxl_unused_final_layers(clip_skip)
        norms = (True, False)
    return tuple(
        apply_text_encoder_freezing(config, encoder, train_text_encoder, count, norm)
        for encoder, count, norm in zip(bundle.text_encoders, unused, norms, strict=True)
    )


def build_model_training(
    model_name: str,
    model: torch.nn.Module,
    settings: ModelOptimizer,
    total_optimizer_steps: int,
    fused: bool = False,
    second: tuple[torch.nn.Module, dict[str, Any]] | None = None,
) -> ModelTraining | None:
    """Optimizer and scheduler for a model's trainable parameters; None when nothing trains.
    ``fused``: per-parameter optimizers stepped in backward (`optimizer.fused`). ``second``:
    a module whose parameters form a second parameter group with its own values of
    `GROUP_KEYS` (SDXL's second text encoder)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    values = _values(settings)
    groups = _second_group(settings, values, second)
    if not parameters and not groups:
        logger.info("%s: no trainable parameters, no optimizer", model_name)
        return None
    if fused:
        if groups and any(k != "params" for k in groups[0]):
            raise UserError(
                "fused_backward_pass: text_encoder_2_overrides gives the second text encoder "
                "values of its own, which per-parameter optimizers cannot keep; remove them or "
                "turn fused_backward_pass off"
            )
        parameters += [p for group in groups for p in group["params"]]
        optimizer, kwargs = _fused(settings, parameters, values)
    else:
        first = [{"params": parameters}] if parameters else []
        params: list[Any] = [*first, *groups] if groups else parameters
        optimizer, kwargs = build_optimizer(settings.name, params, values)
    if has_eval_mode(optimizer):
        optimizer.train()  # schedule-free: steps need train mode
    length = schedule_length(
        settings.value("lr_warmup_steps"), settings.value("lr_decay_steps"), total_optimizer_steps
    )
    scheduler = build_scheduler(settings.value("lr_scheduler"), optimizer, length)
    return ModelTraining(
        model_name=model_name,
        settings=settings,
        optimizer=optimizer,
        scheduler=scheduler,
        kwargs=kwargs,
        length=length,
        trainable_parameters=sum(
            p.numel() for group in optimizer.param_groups for p in group["params"]
        ),
    )


def _second_group(
    settings: ModelOptimizer,
    values: dict[str, Any],
    second: tuple[torch.nn.Module, dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """The second module's parameter group (none without trainable parameters): its keyword
    arguments where they differ from the first group's."""
    if second is None:
        return []
    module, own = second
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        return []
    unused = sorted(set(own) - set(OPTIMIZERS[settings.name].takes))
    if unused:
        raise UserError(
            f"text_encoder_2_overrides: {', '.join(unused)}: not used by {settings.name}, the "
            f"text encoders' optimizer; remove {'them' if len(unused) > 1 else 'it'}"
        )
    first = constructor_kwargs(settings.name, values)
    mine = constructor_kwargs(settings.name, values | own)
    return [{"params": parameters, **{k: v for k, v in mine.items() if first.get(k) != v}}]


def _fused(
    settings: ModelOptimizer,
    parameters: list[torch.nn.Parameter],
    values: dict[str, Any],
) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    if settings.name not in FUSABLE:
        raise UserError(
            f"fused_backward_pass: optimizer '{settings.name}' reads every parameter in its step; "
            f"fused backward works with {', '.join(FUSABLE)}"
        )
    kwargs = constructor_kwargs(settings.name, values)
    cls = optimizer_class(settings.name)
    fused = FusedBackward(parameters, lambda ps: cls(ps, **kwargs), lr=values["lr"])
    return fused, kwargs


def _values(settings: ModelOptimizer) -> dict[str, Any]:
    return {key: settings.value(key) for key in settings.settings.__dataclass_fields__}
