"""The sampling schedulers: EveryDream2's names, what they are in diffusers, and building one.

diffusers is imported only when a scheduler is built, so the names can be checked at start-up
without it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from config.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


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


def scheduler_names() -> tuple[str, ...]:
    """Every sample scheduler name (some need an optional package, see `scheduler_problem`)."""
    return tuple(SCHEDULERS)


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


def is_zero_terminal_snr(noise_scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a noise-scheduler config was rescaled to zero terminal SNR."""
    return bool(noise_scheduler_config.get("rescale_betas_zero_snr", False))


def make_inference_scheduler(
    name: str, noise_scheduler_config: Mapping[str, Any]
) -> SchedulerMixin:
    """The sampling scheduler ``name`` built from the training noise scheduler's config.

    A model trained with zero-terminal SNR (``rescale_betas_zero_snr``) samples with
    ``timestep_spacing="trailing"``, so that the last step starts from pure noise.
    """
    problem = scheduler_problem(name)
    if problem is not None:
        raise UserError(f"sample scheduler: {problem}")
    choice = SCHEDULERS[name]
    diffusers = importlib.import_module("diffusers")
    options = dict(choice.options)
    if is_zero_terminal_snr(noise_scheduler_config):
        options["timestep_spacing"] = "trailing"
    return getattr(diffusers, choice.class_name).from_config(noise_scheduler_config, **options)
