"""Activation memory of a training step, measured without running it.

The trained models' forward pass runs on fake tensors (`torch._subclasses.FakeTensorMode`:
shapes and dtypes, no data, no arithmetic) with the models' own code, so the count follows the
architecture, LoRA adapters, attention kernel, gradient checkpointing and autocast exactly as
the step would run them. Every tensor that autograd saves for the backward pass is counted
once (views with their base), parameters excepted (they are weights, counted elsewhere).

With gradient checkpointing, a checkpointed block (a ResNet block, a transformer block, a CLIP
layer) keeps only its inputs, and rebuilds its activations during backward one block at a
time: the forecast adds the largest block's activations (``recompute_bytes``) to what is saved.

A pass takes about a second for SD1.5's UNet on a CPU, whatever the resolution.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

# The modules that diffusers and transformers wrap in a checkpoint when it is enabled.
CHECKPOINTED = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")


@dataclass(frozen=True)
class Activations:
    """Bytes one forward pass keeps for the backward pass."""

    saved_bytes: int
    recompute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.recompute_bytes


class _Counter:
    """Saved tensors of one pass, and the most saved inside one checkpointable block."""

    def __init__(self, weights: set[int]) -> None:
        self.weights = weights
        self.seen: dict[int, tuple[torch.Tensor, int]] = {}
        self.total = 0
        self.block_start: list[int] = []
        self.largest_block = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        key = id(base)
        if key not in self.weights and key not in self.seen:
            size = base.untyped_storage().nbytes()
            self.seen[key] = (base, size)  # kept alive: ids stay unique during the pass
            self.total += size
        return tensor

    def enter(self, *_: Any) -> None:
        self.block_start.append(self.total)

    def leave(self, *_: Any) -> None:
        self.largest_block = max(self.largest_block, self.total - self.block_start.pop())


@contextlib.contextmanager
def _block_hooks(model: torch.nn.Module, counter: _Counter) -> Iterator[None]:
    handles = []
    for module in model.modules():
        if type(module).__name__ in CHECKPOINTED:
            handles.append(module.register_forward_pre_hook(counter.enter))
            handles.append(module.register_forward_hook(counter.leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_activations(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    checkpointing: bool,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Activations:
    """What ``model(**inputs)`` in training mode saves for backward, measured on fake tensors
    (``inputs`` give shapes and dtypes only). ``checkpointing``: as with gradient checkpointing
    (the blocks' activations are measured without it, their inputs with it). ``device``: where
    the step runs (None: where the model's weights are); the fake weights and inputs are made
    there, so the pass takes that device's autocast rules and attention kernels."""
    if device is None:
        device = next(model.parameters()).device
    key = _signature(model, inputs, checkpointing, autocast_dtype, device)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(model, inputs, checkpointing, autocast_dtype, device)
    return _MEASURED[key]


# Measurements by signature: a process that builds several runs of one model (a benchmark, the
# tests) measures each architecture and shape once.
_MEASURED: dict[str, Activations] = {}


def _signature(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    checkpointing: bool,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
) -> str:
    """Everything a measurement depends on: the class, every parameter's name, shape, dtype
    and whether it trains (adapters included), the attention processors, the inputs' shapes,
    checkpointing, autocast and the device's type."""
    head = f"{type(model).__qualname__}|{checkpointing}|{autocast_dtype}|{device.type}"
    digest = hashlib.sha256(head.encode())
    for name, t in model.named_parameters():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad};".encode())
    processors = getattr(model, "attn_processors", {})  # diffusers: the attention code
    digest.update(repr(sorted((n, type(p).__name__) for n, p in processors.items())).encode())
    for name, t in sorted(inputs.items()):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad};".encode())
    return digest.hexdigest()


def _measure(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    checkpointing: bool,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
) -> Activations:
    mode = FakeTensorMode()
    with mode:  # fake tensors of the same shape, strides and dtype on ``device``; no data
        tensors = {
            name: _empty_like(t, device).requires_grad_(t.requires_grad)
            for name, t in model.named_parameters()
        }
        tensors |= {name: _empty_like(t, device) for name, t in model.named_buffers()}
    plain = _count(model, tensors, inputs, mode, autocast_dtype, device, checkpoint=False)
    if not checkpointing:
        return Activations(plain.total, 0)
    checkpointed = _count(model, tensors, inputs, mode, autocast_dtype, device, checkpoint=True)
    return Activations(checkpointed.total, plain.largest_block)


def _empty_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Under a `FakeTensorMode`: about twice as fast as ``mode.from_tensor``, which describes
    the real tensor's storage and views."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


def _count(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    mode: FakeTensorMode,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
    checkpoint: bool,
) -> _Counter:
    counter = _Counter({id(t) for t in tensors.values()})
    autocast = (
        contextlib.nullcontext()
        if autocast_dtype is None
        else torch.autocast(device.type, dtype=autocast_dtype)
    )
    was_training = model.training
    model.train()
    with _checkpointing(model, checkpoint), _block_hooks(model, counter), mode, autocast:
        fake_inputs = {
            k: torch.empty(v.shape, dtype=v.dtype, device=device).requires_grad_(v.requires_grad)
            for k, v in inputs.items()
        }
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            functional_call(model, tensors, (), _nested(fake_inputs))
    model.train(was_training)
    return counter


@contextlib.contextmanager
def _checkpointing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Gradient checkpointing on (or off) for the pass, then as it was."""
    flags = {m: m.gradient_checkpointing for m in model.modules() if _has_flag(m)}
    for module in flags:
        module.gradient_checkpointing = on
    if on:
        _enable(model)
    try:
        yield
    finally:
        for module, value in flags.items():
            module.gradient_checkpointing = value


def _has_flag(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "gradient_checkpointing", None), bool)


def _enable(model: torch.nn.Module) -> None:
    """Install the checkpoint function where the library keeps one (flags set by the caller)."""
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable()


def step_activations(
    unet: torch.nn.Module | None,
    text_encoders: Sequence[torch.nn.Module],
    batch_size: int,
    bucket: tuple[int, int],
    checkpointing: bool,
    autocast_dtype: torch.dtype | None,
    device: torch.device | None = None,
) -> dict[str, Activations]:
    """The activations of one step for a batch of ``batch_size`` images of ``bucket`` (width,
    height) pixels on ``device`` (None: where the weights are): the UNet's (None: nothing
    trains) and the trained text encoders' (none: they do not train, so they run without
    gradients; SDXL's two run one after the other, so their saved tensors add up). A frozen
    UNet still keeps activations when the text encoder trains: its gradient flows back through
    them."""
    out: dict[str, Activations] = {}
    if text_encoders:
        parts = [
            forward_activations(
                encoder,
                {"input_ids": _ids(encoder, batch_size)},
                checkpointing,
                autocast_dtype,
                device,
            )
            for encoder in text_encoders
        ]
        out["text_encoder"] = Activations(
            sum(part.saved_bytes for part in parts), max(part.recompute_bytes for part in parts)
        )
    if unet is not None:
        inputs = _unet_inputs(unet, batch_size, bucket, text_trains=bool(text_encoders))
        out["unet"] = forward_activations(unet, inputs, checkpointing, autocast_dtype, device)
    return out


def _ids(text_encoder: torch.nn.Module, batch_size: int) -> torch.Tensor:
    return torch.zeros(batch_size, text_encoder.config.max_position_embeddings, dtype=torch.long)


def _unet_inputs(
    unet: torch.nn.Module, batch_size: int, bucket: tuple[int, int], text_trains: bool
) -> dict[str, torch.Tensor]:
    """The UNet's inputs for a batch; SDXL's added conditions as ``added_cond_kwargs.<name>``
    (nested again by `_count`)."""
    width, height = bucket
    config = unet.config
    inputs = {
        "sample": torch.zeros(batch_size, config.in_channels, height // 8, width // 8),
        "timestep": torch.zeros(batch_size, dtype=torch.long),
        # a trained text encoder gets its gradient through the UNet's input
        "encoder_hidden_states": torch.zeros(
            batch_size, 77, config.cross_attention_dim
        ).requires_grad_(text_trains),
    }
    if config.addition_embed_type == "text_time":
        time_ids = 6 * config.addition_time_embed_dim
        pooled = config.projection_class_embeddings_input_dim - time_ids
        inputs[f"{_ADDED}text_embeds"] = torch.zeros(batch_size, pooled).requires_grad_(text_trains)
        inputs[f"{_ADDED}time_ids"] = torch.zeros(batch_size, 6)
    return inputs


_ADDED = "added_cond_kwargs."


def _nested(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``added_cond_kwargs.<name>`` entries gathered into the ``added_cond_kwargs`` dict."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key.startswith(_ADDED):
            out.setdefault(_ADDED[:-1], {})[key[len(_ADDED) :]] = value
        else:
            out[key] = value
    return out
