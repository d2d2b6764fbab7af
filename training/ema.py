"""EMA of the trained weights, as EveryDream2 keeps it (``ema_*`` keys of train.json).

EMA is on when ``ema_decay_rate`` or ``ema_strength_target`` is set. Every
``ema_update_interval`` optimizer steps each trained parameter's copy becomes
``ema * decay + weight * (1 - decay)`` with a constant decay; ``ema_strength_target`` t gives
the decay for which the starting weights keep the share t of the EMA at the end of the run,
``t ** (1 / (run steps / interval))`` (EveryDream2's formula, in optimizer steps).

`ParameterEMA` holds the copies of the trainable parameters of the trained models (frozen
parameters never change: the live ones are the EMA's) on ``ema_device``; it updates them
tensor by tensor, so an EMA in CPU memory never needs a second copy of a model on the device.
`ParameterEMA.swapped_in` exchanges them with the live weights in place (one tensor at a time,
exactly reversible), so samples and ``_ema`` checkpoints use the live modules themselves.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config.ema import ema_enabled
from config.errors import UserError
from config.train_config import TrainConfig
from models import ModelBundle, classify_resume_ckpt
from training.checkpointing.find_last import FINDLAST, find_last_checkpoint

logger = logging.getLogger(__name__)

EMA_SUFFIX = "_ema"  # EveryDream2's name of the EMA pipeline beside a checkpoint
KEY = "ema_resume_model"


@dataclass(frozen=True)
class EmaSettings:
    """The EMA a run keeps, resolved from train.json before any model loads."""

    decay: float  # the decay in force
    interval: int  # optimizer steps between updates
    device: torch.device  # where the EMA copy lives
    device_setting: str  # ema_device as given: "cpu" or "cuda" (the training device)
    strength_target: float | None  # ema_strength_target, when the decay was derived from it
    total_steps: int  # the run's optimizer steps
    sample_trained: bool  # samples with the trained (non-EMA) weights
    sample_ema: bool  # samples with the EMA weights
    start_model: str | None  # ema_resume_model, resolved; None: the weights training starts from

    @property
    def updates_in_run(self) -> int:
        return self.total_steps // self.interval

    def describe(self) -> dict[str, Any]:
        """The dry run's ``ema`` section."""
        samples = [("trained", self.sample_trained), ("ema", self.sample_ema)]
        derived = self.strength_target is not None
        return {
            "decay": self.decay,
            "decay_from": "ema_strength_target" if derived else "ema_decay_rate",
            "strength_target": self.strength_target,
            "update_interval": self.interval,
            "updates_in_run": self.updates_in_run,
            "device": str(self.device),
            "ema_device": self.device_setting,
            "samples": [name for name, on in samples if on],
            "start": self.start_model,
        }


def decay_for_strength(target: float, interval: int, total_steps: int) -> float:
    """EveryDream2's decay for ``ema_strength_target``: decay ** (steps / interval) == target."""
    updates = total_steps / interval
    return target ** (1 / updates)


def ema_device(setting: str, training_device: torch.device) -> torch.device:
    """``cpu``: system memory; ``cuda``: the device the run trains on (the CPU without CUDA)."""
    if setting == "cpu":
        return torch.device("cpu")
    if training_device.type != "cuda":
        logger.info("ema_device cuda: training on %s, so the EMA lives there too", training_device)
    return training_device


def _start_model(config: TrainConfig, resumed_ema: bool) -> str | None:
    """``ema_resume_model`` resolved, or None: not set, or the resumed state holds the EMA."""
    if config.ema_resume_model is None:
        return None
    if resumed_ema:
        logger.warning(
            "%s %s is not used: the training state being resumed holds the EMA weights",
            KEY,
            config.ema_resume_model,
        )
        return None
    return resolve_start_model(config)


def ema_settings(
    config: TrainConfig, total_steps: int, device: torch.device, resumed_ema: bool = False
) -> EmaSettings | None:
    """The run's EMA (None when off); ``resumed_ema``: the training state being resumed has one.

    ``ema_resume_model`` is resolved (``findlast``) and checked here, before any model loads;
    its weights are loaded when training starts (`load_start_weights`).
    """
    if not ema_enabled(config):
        if resumed_ema:
            logger.warning(
                "the training state being resumed holds an EMA; EMA is off now (neither "
                "ema_decay_rate nor ema_strength_target is set), so it is dropped"
            )
        return None
    interval = config.ema_update_interval
    target = config.ema_strength_target
    decay = config.ema_decay_rate
    if target is not None:
        decay = decay_for_strength(target, interval, total_steps)
        logger.info("ema_strength_target %g: the EMA decay rate is %.10g", target, decay)
    assert decay is not None
    if interval > total_steps:
        logger.warning(
            "ema_update_interval %d is more than the run's %d optimizer steps: the EMA is never "
            "updated and its checkpoints hold the starting weights",
            interval,
            total_steps,
        )
    start = _start_model(config, resumed_ema)
    sample_ema = config.ema_sample_ema_model or not config.ema_sample_nonema_model
    return EmaSettings(
        decay=decay,
        interval=interval,
        device=ema_device(config.ema_device, device),
        device_setting=config.ema_device,
        strength_target=target,
        total_steps=total_steps,
        sample_trained=config.ema_sample_nonema_model,
        sample_ema=sample_ema,
        start_model=start,
    )


def _renamed(error: UserError) -> UserError:
    """A `resume_ckpt` message about the model given as ``ema_resume_model``."""
    text = str(error).removeprefix("resume_ckpt: ")
    return UserError(f"{KEY}: {text}")


def resolve_start_model(config: TrainConfig) -> str:
    """``ema_resume_model`` checked as `resume_ckpt` is; ``findlast``: the newest ``_ema``."""
    value = config.ema_resume_model
    assert value is not None
    if value == FINDLAST:
        save_ckpt_dir = None if config.save_ckpt_dir is None else Path(config.save_ckpt_dir)
        found = find_last_checkpoint(
            config.project_name,
            Path(config.logdir).expanduser(),
            save_ckpt_dir,
            suffix=EMA_SUFFIX,
            key=KEY,
        )
        logger.info("%s findlast: the EMA starts from %s", KEY, found)
        value = str(found)
    try:
        classify_resume_ckpt(value)
    except UserError as error:
        raise _renamed(error) from error
    return value


# --- the parameters an EMA covers ------------------------------------------------------------


def tracked_parameters(
    bundle: ModelBundle, trained: Iterable[str]
) -> list[tuple[str, nn.Parameter]]:
    """``(model.parameter name, parameter)`` of every trainable parameter of the trained models."""
    return [
        (f"{model}.{name}", parameter)
        for model in trained
        for name, parameter in bundle.component(model).named_parameters()
        if parameter.requires_grad
    ]


def ema_memory(settings: EmaSettings, bundle: ModelBundle, trained: Iterable[str]) -> dict:
    """Bytes of the EMA copy and where it lives (the memory report's ``ema``)."""
    trained = list(trained)
    size = sum(p.numel() * p.element_size() for _, p in tracked_parameters(bundle, trained))
    return {
        "device": str(settings.device),
        "models": trained,
        "weights_bytes": size,
        "total_bytes": size,
        "total_gib": round(size / 2**30, 3),
    }


def load_start_weights(source: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The weights called ``names`` (as `tracked_parameters` names them) of model ``source``.

    The global RNG is left as it was (building a built-in model seeds it). `UserError` when
    the model lacks one of them or has it in another shape.
    """
    from models import load_models

    with torch.random.fork_rng(devices=[]):
        try:
            bundle = load_models(source)
        except UserError as error:
            raise _renamed(error) from error
    found: dict[str, torch.Tensor] = {}
    for model in dict.fromkeys(name.split(".", 1)[0] for name in names):
        for name, parameter in bundle.component(model).named_parameters():
            found[f"{model}.{name}"] = parameter.detach()
    _check_same_shapes(f"{KEY}: {source}", names, found, None)
    return {name: found[name] for name in names}


def _check_same_shapes(
    origin: str,
    names: list[str],
    found: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size] | None,
) -> None:
    """`UserError` naming the first weight of ``names`` that ``found`` lacks or has in another
    shape than ``shapes`` says; ``origin`` starts the message (the key and where it points)."""
    missing = [name for name in names if name not in found]
    if missing:
        raise UserError(
            f"{origin}: not the architecture being trained: it has no {missing[0]} "
            f"({len(missing)} weight(s) missing)"
        )
    if shapes is not None:
        different = [name for name in names if found[name].shape != shapes[name]]
        if different:
            name = different[0]
            raise UserError(
                f"{origin}: not the architecture being trained: {name} is "
                f"{list(found[name].shape)} there, {list(shapes[name])} here "
                f"({len(different)} weight(s) differ)"
            )


# --- the EMA copy ------------------------------------------------------------------------------


class ParameterEMA:
    """Copies of named live parameters on one device, updated as EveryDream2 does."""

    def __init__(
        self,
        parameters: list[tuple[str, nn.Parameter]],
        device: torch.device,
        start: Mapping[str, torch.Tensor] | None = None,
        origin: str = "",
    ) -> None:
        """The copies start as ``start`` (by name; ``origin``, "<key>: <where>", starts the
        messages about it) or the live values. Tensors of ``start`` already on ``device`` in
        the right dtype are taken as they are (not copied)."""
        self.names = [name for name, _ in parameters]
        self.live = [parameter for _, parameter in parameters]
        self.device = torch.device(device)
        if start is not None:
            self._check(start, origin)
        self.shadow = [self._copy(name, live, start) for name, live in parameters]

    def _check(self, start: Mapping[str, torch.Tensor], origin: str) -> None:
        shapes = dict(zip(self.names, (p.shape for p in self.live), strict=True))
        _check_same_shapes(origin, self.names, start, shapes)
        extra = set(start) - set(self.names)
        if extra:
            raise UserError(
                f"{origin}: its EMA weights include {sorted(extra)[0]}, which does not train "
                f"now ({len(extra)} such weight(s)); did text_encoder_freezing change?"
            )

    @torch.no_grad()
    def _copy(
        self, name: str, live: nn.Parameter, start: Mapping[str, torch.Tensor] | None
    ) -> torch.Tensor:
        if start is None:
            return torch.empty_like(live, device=self.device).copy_(live)
        tensor = start[name].detach()
        if tensor.device == self.device and tensor.dtype == live.dtype:
            return tensor
        return torch.empty_like(live, device=self.device).copy_(tensor)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``ema = ema * decay + live * (1 - decay)``, one tensor at a time."""
        for shadow, live in zip(self.shadow, self.live, strict=True):
            shadow.mul_(decay).add_(live.detach().to(shadow.device), alpha=1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights by name (the tensors themselves, not copies)."""
        return dict(zip(self.names, self.shadow, strict=True))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the live parameters hold the EMA weights (and the copies the live ones).

        Values are exchanged in place, one tensor at a time (a temporary the size of one
        tensor), and exchanged back on the way out whatever happens: bit for bit as before.
        """
        exchanged = 0
        pairs = list(zip(self.shadow, self.live, strict=True))
        try:
            for shadow, live in pairs:
                _exchange(shadow, live)
                exchanged += 1
            yield
        finally:
            for shadow, live in itertools.islice(pairs, exchanged):
                _exchange(shadow, live)


@torch.no_grad()
def _exchange(shadow: torch.Tensor, live: nn.Parameter) -> None:
    held = live.detach().clone()
    live.copy_(shadow)
    shadow.copy_(held)
