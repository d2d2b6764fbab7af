"""FSDP2: the trained models sharded over the processes, with torch's ``fully_shard``.

Launched with ``accelerate launch --use_fsdp --fsdp_version 2`` (or the accelerate config
``examples/accelerate_fsdp2.yaml``); accelerate forms the process group, torch's FSDP2 shards.
Each trained model (the UNet; the text encoder, or SDXL's two, when they train) is split into
units that a process gathers whole in turn: every ResNet block, transformer block and CLIP
layer, then the model itself for what is left. Each process keeps 1/N of the weights, their
gradients and the optimizer state. Frozen models (the VAE, a frozen text encoder) stay whole in
every process.

Checkpoints stay whole: the weights and the optimizer states are gathered into the main process
(`Sharding.gather`), which writes the usual folder, single file and training state, so a
checkpoint of an FSDP run resumes under FSDP, DDP or one process alike. See docs/multi-gpu.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers import ModelMixin
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from config.ema import ema_enabled
from config.errors import UserError
from config.train_config import TrainConfig
from models import ModelBundle
from optimizer.build import ModelTraining
from optimizer.config import OptimizerConfig
from optimizer.registry import OPTIMIZERS
from training.distributed import FsdpOptions

logger = logging.getLogger(__name__)

# The units of a model that a process gathers whole in turn (by class name: diffusers' and
# transformers' classes).
UNIT_CLASSES = ("ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer")

# The models each trained role is made of, by `ModelBundle.named_models` name.
ROLE_MODELS = {"unet": ("unet",), "text_encoder": ("text_encoder", "text_encoder_2")}

# Gathered whole into the main process's CPU memory (empty elsewhere).
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Gathered:
    """A sharded run gathered whole: the models (main process; None elsewhere) and each
    trained role's optimizer state, keyed as an unsharded optimizer's ``state_dict()``."""

    bundle: ModelBundle | None
    optimizers: dict[str, dict[str, Any]]


class Sharding:
    """The sharded models of a run, and how to gather them whole or load optimizer state."""

    def __init__(self, bundle: ModelBundle, trainings: list[ModelTraining]) -> None:
        self.bundle = bundle
        self.trainings = trainings
        self.names = [
            name
            for training in trainings
            for name in ROLE_MODELS[training.model_name]
            if name in bundle.named_models()
        ]
        models = bundle.named_models()
        self._blueprints = {
            name: _Blueprint(type(models[name]), models[name].config) for name in self.names
        }

    def shard(self, device: torch.device, options: FsdpOptions) -> None:
        """Shard the trained models in place; the optimizers then step the shards."""
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        before = {t.model_name: _fqns(self.bundle.component(t.model_name)) for t in self.trainings}
        models = self.bundle.named_models()
        for name in self.names:
            units = _shard_model(models[name], mesh, options.reshard_after_forward)
            logger.info(
                "FSDP: %s sharded in %d units over %d processes",
                name,
                units + 1,
                dist.get_world_size(),
            )
        for training in self.trainings:
            after = dict(self.bundle.component(training.model_name).named_parameters())
            names = before[training.model_name]
            for group in training.optimizer.param_groups:
                group["params"] = [after[names[id(p)]] for p in group["params"]]

    def gather_optimizers(self) -> dict[str, dict[str, Any]]:
        """Each trained role's optimizer state whole, keyed as an unsharded optimizer's
        ``state_dict()`` (main process; empty elsewhere). Every process must call it."""
        self._reshard()
        states = {}
        for training in self.trainings:
            role = self.bundle.component(training.model_name)
            whole = get_optimizer_state_dict(role, training.optimizer, options=_WHOLE)
            states[training.model_name] = _by_index(whole, training.optimizer, role)
        return states

    def gather_models(self, main: bool) -> ModelBundle | None:
        """The bundle with whole copies of the sharded models, in the main process's CPU
        memory (None in the other processes). Every process must call it."""
        self._reshard()
        models = self.bundle.named_models()
        copies = {}
        for name in self.names:
            state = get_model_state_dict(models[name], options=_WHOLE)
            if main:
                copies[name] = _whole_copy(self._blueprints[name], state, models[name])
        return dataclasses.replace(self.bundle, **copies) if main else None

    def load_optimizer_state(self, training: ModelTraining, state: dict[str, Any]) -> None:
        """Load a whole optimizer state (as an unsharded optimizer saves it) into the shards."""
        role = self.bundle.component(training.model_name)
        by_name = _by_name(state, training.optimizer, role)
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(
            role, training.optimizer, optim_state_dict=by_name, options=options
        )

    def _reshard(self) -> None:
        """Free what a forward without backward left gathered (samples, validation): the
        state-dict functions name the sharded parameters."""
        models = self.bundle.named_models()
        for name in self.names:
            for module in models[name].modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def _shard_model(model: nn.Module, mesh: Any, reshard_after_forward: bool) -> int:
    """``fully_shard`` each unit of ``model``, then the model; returns the number of units."""
    units = [m for m in model.modules() if type(m).__name__ in UNIT_CLASSES]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    _keep_output_capture(model)
    return len(units)


def _keep_output_capture(model: nn.Module) -> None:
    """Let a sharded transformers model still return ``hidden_states``: transformers 5 looks up
    what a model records by its class, and sharding gives it a new class (FSDP<name>)."""
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is not None and hasattr(model, "_can_record_outputs"):
        registry[model] = model._can_record_outputs


def _fqns(module: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


@dataclass(frozen=True)
class _Blueprint:
    """How to build an empty copy of a model: its class and configuration."""

    cls: type[nn.Module]
    config: Any


def _whole_copy(
    blueprint: _Blueprint, state: dict[str, torch.Tensor], live: nn.Module
) -> nn.Module:
    """An unsharded copy of a model with the gathered weights (CPU memory, shared with
    ``state``); buffers outside the state dict come from the live model."""
    with torch.device("meta"):
        if issubclass(blueprint.cls, ModelMixin):
            copy = blueprint.cls.from_config(blueprint.config)
        else:
            copy = blueprint.cls(blueprint.config)
    copy.load_state_dict({k: _owning(v) for k, v in state.items()}, strict=True, assign=True)
    live_buffers = dict(live.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:
            owner, _, attribute = name.rpartition(".")
            module = copy.get_submodule(owner)
            module.register_buffer(attribute, live_buffers[name].to("cpu"), persistent=False)
    return copy.eval()


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it where it is a view into a larger (padded) gathered buffer
    (safetensors refuses to write those)."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if whole and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _order(optimizer: torch.optim.Optimizer, role: nn.Module) -> list[str]:
    """The optimizer's parameters by name, in its order (the index its state_dict uses)."""
    names = _fqns(role)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(
    whole: dict[str, Any], optimizer: torch.optim.Optimizer, role: nn.Module
) -> dict[str, Any]:
    """A name-keyed whole optimizer state as ``optimizer.state_dict()`` keys it (empty outside
    the main process)."""
    if not whole:
        return {}
    index = {name: i for i, name in enumerate(_order(optimizer, role))}
    return {
        "state": {index[name]: value for name, value in whole["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in whole["param_groups"]
        ],
    }


def _by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, role: nn.Module
) -> dict[str, Any]:
    order = _order(optimizer, role)
    return {
        "state": {order[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [order[int(i)] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def check_fsdp(
    config: TrainConfig, optim: OptimizerConfig, trained: Iterable[str], grad_scaler: bool
) -> None:
    """`UserError` listing every setting that an FSDP run does not run (``trained``: the roles
    that train; ``grad_scaler``: the precision is fp16 with a grad scaler)."""
    optimizers = {"unet": optim.unet.name, "text_encoder": optim.text_encoder.name}
    refused = [
        (
            f"{role} optimizer {name}",
            "its state cannot be sharded (8-bit blocks or factored "
            f"moments); choose one of {', '.join(shardable_optimizers())}",
        )
        for role, name in optimizers.items()
        if role in trained and not OPTIMIZERS[name].shardable
    ]
    checks = (
        (
            "lora_rank",
            config.lora_rank > 0,
            "FSDP shards full fine-tunes; a LoRA trains on one GPU or with DDP (--multi_gpu)",
        ),
        ("ema_decay_rate/ema_strength_target", ema_enabled(config), "the EMA is not sharded"),
        (
            "fused_backward_pass",
            config.fused_backward_pass,
            "FSDP reduces the gradients before any parameter may step",
        ),
        (
            "vram_budget_gb",
            config.vram_budget_gb is not None,
            "the planner forecasts one unsharded process",
        ),
        ("compile_unet", config.compile_unet, "not run with FSDP"),
        (
            "mixed_precision",
            grad_scaler,
            "fp16 with a grad scaler is not run with FSDP; "
            "use bf16 (mixed_precision auto on a GPU that has it) or no",
        ),
    )
    refused += [(key, why) for key, is_set, why in checks if is_set]
    if refused:
        raise UserError(
            "FSDP (accelerate launch --use_fsdp) does not run with: "
            + "; ".join(f"{key} ({why})" for key, why in refused)
            + " (docs/multi-gpu.md)"
        )


def shardable_optimizers() -> tuple[str, ...]:
    return tuple(name for name, spec in OPTIMIZERS.items() if spec.shardable)
