"""Text-encoder freezing: which parts of a CLIP text encoder stay trainable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from config.fields import parse_fields, setting
from config.limits import MAX_TEXT_ENCODER_LAYERS


@dataclass(frozen=True)
class FreezingConfig:
    """The ``text_encoder_freezing`` block of optimizer.json."""

    freeze_embeddings: bool | None = setting(
        None, "Freeze the token and position embeddings (default false, see unfreeze_*)."
    )
    freeze_front_n_layers: int | None = setting(
        None,
        "n >= 0 freezes layers 0..n-1; n < 0 freezes all but the last |n|; null freezes none.",
        minimum=-MAX_TEXT_ENCODER_LAYERS,
        maximum=MAX_TEXT_ENCODER_LAYERS,
    )
    freeze_final_layer_norm: bool | None = setting(
        None, "Freeze the final LayerNorm (default false)."
    )
    unfreeze_final_n_layers: int | None = setting(
        None,
        "Leave only the last n layers trainable (and freeze the embeddings unless "
        "freeze_embeddings says otherwise). Also spelled unfreeze_last_n_layers.",
        minimum=0,
        maximum=MAX_TEXT_ENCODER_LAYERS,
    )


FREEZING_ALIASES = {"unfreeze_last_n_layers": "unfreeze_final_n_layers"}


def parse_freezing(raw: Any, where: str) -> tuple[FreezingConfig, list[str]]:
    """The ``text_encoder_freezing`` block of optimizer.json ``where``, and its problems."""
    key = "text_encoder_freezing"
    if raw is None:
        return FreezingConfig(), []
    if not isinstance(raw, dict):
        return FreezingConfig(), [f"{where}: {key}: expected an object {{...}} or null"]
    values, problems = parse_fields(
        FreezingConfig, raw, where, key_prefix=f"{key}.", aliases=FREEZING_ALIASES
    )
    for old, new in FREEZING_ALIASES.items():
        if raw.get(old) is not None and raw.get(new) is not None and raw[old] != raw[new]:
            problems.append(f"{where}: {key}: {old} and {new} are the same key with two values")
    return FreezingConfig(**values), problems


@dataclass(frozen=True)
class FreezePlan:
    """What to freeze in an encoder of ``num_layers`` layers."""

    num_layers: int
    frozen_layers: tuple[int, ...]
    embeddings_frozen: bool
    final_layer_norm_frozen: bool


def _front_layers(n: int, num_layers: int) -> tuple[int, ...]:
    return tuple(range(n if n >= 0 else num_layers + n))


def plan_freezing(config: FreezingConfig, num_layers: int) -> tuple[FreezePlan | None, list[str]]:
    """Turn the settings into a plan for an encoder of ``num_layers`` layers.

    Returns the plan, or None and the problems (key: message) when the settings do not fit.
    """
    problems = []
    front = config.freeze_front_n_layers
    keep = config.unfreeze_final_n_layers
    if front is not None and abs(front) > num_layers:
        problems.append(
            f"freeze_front_n_layers: {front} is beyond the text encoder's {num_layers} layers "
            f"(allowed: -{num_layers} to {num_layers})"
        )
    if keep is not None and keep > num_layers:
        problems.append(
            f"unfreeze_final_n_layers: {keep} is more than the text encoder's {num_layers} layers"
        )
    if problems:
        return None, problems

    frozen = _front_layers(front, num_layers) if front is not None else ()
    if keep is not None:
        frozen_by_keep = tuple(range(num_layers - keep))
        if front is not None and frozen != frozen_by_keep:
            return None, [
                f"unfreeze_final_n_layers: {keep} (freezes layers 0-{num_layers - keep - 1}) "
                f"contradicts freeze_front_n_layers: {front}; give only one of them"
            ]
        frozen = frozen_by_keep
    embeddings = config.freeze_embeddings
    if embeddings is None:
        embeddings = keep is not None and keep < num_layers
    final_norm = bool(config.freeze_final_layer_norm)
    return FreezePlan(num_layers, frozen, embeddings, final_norm), []


def frozen_modules(
    plan: FreezePlan,
    embeddings: torch.nn.Module,
    layers: torch.nn.ModuleList,
    final_layer_norm: torch.nn.Module,
) -> list[torch.nn.Module]:
    """The modules a plan freezes."""
    assert len(layers) == plan.num_layers, "plan made for another encoder"
    modules: list[torch.nn.Module] = [layers[i] for i in plan.frozen_layers]
    if plan.embeddings_frozen:
        modules.append(embeddings)
    if plan.final_layer_norm_frozen:
        modules.append(final_layer_norm)
    return modules


def freeze(modules: list[torch.nn.Module]) -> None:
    """Stop gradients for every parameter of these modules."""
    for module in modules:
        module.requires_grad_(False)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
