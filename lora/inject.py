"""Putting peft's LoRA adapters into the models that train.

`add_lora_adapters` is what a run calls once its models are loaded and the text encoder's
freezing is known: the UNet gets adapters unless it is frozen, the text encoder only when it
trains, and never in its frozen layers. Afterwards exactly the adapter parameters have
``requires_grad``: every base weight is frozen, so the optimizers (which take the trainable
parameters) train the adapters and nothing else.

Randomness: peft creates each adapter on the CPU and draws its ``lora_A`` from torch's CPU
generator (the layer's own initialisation, then Kaiming-uniform), module by module in the
model's order; ``lora_B`` starts at zero, so a fresh adapter changes no output. With a
``seed`` this happens under that seed with the caller's RNG state left as it was; without one
it draws from the global CPU generator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
from diffusers.loaders.peft import PeftAdapterMixin
from peft import inject_adapter_in_model
from torch import nn

from lora.adapters import ADAPTER, adapted_layers, adapter_parameters, has_adapters
from lora.settings import LoraSettings
from lora.targets import Target, lora_config, text_encoder_targets, unet_targets
from models.bundle import ModelBundle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Injected:
    """What got adapters: the targets of each model (empty when the model does not train)."""

    unet: tuple[Target, ...]
    text_encoder: tuple[Target, ...]
    text_encoder_2: tuple[Target, ...] = ()


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def inject(model: nn.Module, targets: list[Target], settings: LoraSettings) -> None:
    """Give every target module of ``model`` an adapter; freeze everything else.

    diffusers models get it through their own ``add_adapter`` (as diffusers' training scripts
    do); other models (the transformers text encoder) through peft's
    ``inject_adapter_in_model``, which transformers' ``add_adapter`` wraps: transformers 5
    refuses its wrapper with peft releases before 0.22. Both give the same layers.
    """
    assert not has_adapters(model), "the model has adapters already"
    config = lora_config(targets, settings)
    model.requires_grad_(False)
    if isinstance(model, PeftAdapterMixin):
        model.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    _check(model, targets)


def _check(model: nn.Module, targets: list[Target]) -> None:
    """Exactly the targets have adapters; exactly the adapter parameters train."""
    layers = adapted_layers(model)
    assert set(layers) == {t.name for t in targets}, "peft adapted other modules than asked"
    for target in targets:
        layer = layers[target.name]
        assert layer.r[ADAPTER] == target.rank and layer.lora_alpha[ADAPTER] == target.alpha
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model).values()}


def add_lora_adapters(
    bundle: ModelBundle,
    settings: LoraSettings,
    train_unet: bool,
    train_text_encoder: bool,
    frozen_text_layers: Collection[int] = (),
    seed: int | None = None,
    frozen_text_layers_2: Collection[int] = (),
) -> Injected:
    """Add adapters to the models that train (see the module's docstring); returns the targets.

    A model that does not train, or whose targets all lie in frozen layers, gets none and is
    frozen whole. SDXL's second encoder trains with the first, ``frozen_text_layers_2`` left
    out.
    """
    unet = unet_targets(bundle.unet, settings) if train_unet else []
    text: list[Target] = []
    text_2: list[Target] = []
    if train_text_encoder:
        text = text_encoder_targets(bundle.text_encoder, settings, frozen_text_layers)
        if bundle.text_encoder_2 is not None:
            text_2 = text_encoder_targets(bundle.text_encoder_2, settings, frozen_text_layers_2)
    models = [("unet", bundle.unet, unet), ("text_encoder", bundle.text_encoder, text)]
    if bundle.text_encoder_2 is not None:
        models.append(("text_encoder_2", bundle.text_encoder_2, text_2))
    with _seeded(seed):
        for name, model, targets in models:
            if not targets:
                model.requires_grad_(False)
                continue
            inject(model, targets, settings)
            logger.info("LoRA: %s gets %d adapters", name, len(targets))
    return Injected(tuple(unet), tuple(text), tuple(text_2))
