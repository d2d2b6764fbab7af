"""Which modules get adapters: the module set of kohya's ``networks.lora``.

kohya's ``LoRANetwork`` walks a model, finds every module whose class is one of a few block
classes, and gives an adapter to each ``Linear`` and ``Conv2d`` inside it:

- UNet: every Linear and 1x1 Conv2d inside ``Transformer2DModel`` (attention q/k/v/out,
  feed-forward, ``proj_in``/``proj_out``), at the network rank and alpha;
- UNet with a conv rank (LoCon): also every Linear and Conv2d inside ``ResnetBlock2D``,
  ``Downsample2D`` and ``Upsample2D``: the 3x3 convolutions at the conv rank and alpha, the
  Linear (``time_emb_proj``) and 1x1 (``conv_shortcut``) ones at the network rank and alpha;
- text encoder: every Linear inside ``CLIPAttention`` (``CLIPSdpaAttention`` in some
  transformers 4 releases) and ``CLIPMLP``: q/k/v/out projections, fc1, fc2.

Nothing else (time embedding, ``conv_in``/``conv_out``, norms, embeddings) gets one. A
text-encoder layer that is frozen gets none: adapters go where training goes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from lora.settings import LoraSettings
from models.text import text_encoder_parts

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class Target:
    """A module that gets an adapter: its path in the model, rank and alpha."""

    name: str
    rank: int
    alpha: float
    conv3x3: bool  # a convolution with a kernel larger than 1x1 (LoCon's rank and alpha)


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def block_layers(model: nn.Module, blocks: Collection[str]) -> Iterator[tuple[str, nn.Module]]:
    """Every Linear and Conv2d inside a module whose class name is in ``blocks``, by path.

    Class names, not classes, as kohya matches them: diffusers and transformers define the
    classes, and names stay the same across their versions. A module peft already gave an
    adapter counts as its base layer (its inner layers are not listed).
    """
    seen: set[str] = set()
    for block_name, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        adapted: list[str] = []
        for child_name, child in block.named_modules():
            name = f"{block_name}.{child_name}" if block_name else child_name
            if any(name.startswith(f"{inner}.") for inner in adapted) or name in seen:
                continue
            if isinstance(child, LoraLayer):
                adapted.append(name)
                child = child.get_base_layer()
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                seen.add(name)
                yield name, child


def unet_targets(unet: nn.Module, settings: LoraSettings) -> list[Target]:
    """The UNet modules that get adapters (see the module's docstring)."""
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if settings.locon else ())
    targets = []
    for name, module in block_layers(unet, blocks):
        if _is_conv3x3(module):
            if settings.locon:
                targets.append(Target(name, settings.conv_rank, settings.conv_alpha, True))
        else:
            targets.append(Target(name, settings.rank, settings.alpha, False))
    return targets


def text_encoder_targets(
    text_encoder: nn.Module, settings: LoraSettings, frozen_layers: Collection[int] = ()
) -> list[Target]:
    """The text-encoder modules that get adapters, leaving out those of ``frozen_layers``.

    ``frozen_layers``: indices of the encoder layers that do not train (text-encoder freezing
    and the layers ``clip_skip`` leaves unused).
    """
    layers = text_encoder_parts(text_encoder)[1]
    frozen = set(frozen_layers)
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    return [
        Target(name, settings.rank, settings.alpha, False)
        for name, module in block_layers(text_encoder, TEXT_ENCODER_BLOCKS)
        if layer_of.get(id(module)) not in frozen
    ]


def lora_config(targets: list[Target], settings: LoraSettings) -> LoraConfig:
    """peft's configuration for exactly these modules.

    The rank and alpha of every target that differ from the network's (LoCon's 3x3
    convolutions) go into ``rank_pattern`` / ``alpha_pattern``. peft's default initialisation:
    ``lora_B`` is zero, so a new adapter changes nothing, and ``lora_A`` is Kaiming-uniform
    (as kohya's). peft may rewrite ``target_modules`` to the shortest name endings that pick
    the same modules.
    """
    assert targets, "a LoRA configuration needs at least one target"
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=[t.name for t in targets],
        rank_pattern={t.name: t.rank for t in targets if t.rank != settings.rank},
        alpha_pattern={t.name: t.alpha for t in targets if t.alpha != settings.alpha},
        init_lora_weights=True,
    )
