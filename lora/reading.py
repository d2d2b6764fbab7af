"""Reading a LoRA file to start training from (``lora_init``): kohya's or diffusers' format.

`read_lora_file` takes a ``.safetensors`` file, or a folder holding diffusers'
``pytorch_lora_weights.safetensors`` (a checkpoint of this trainer), and gives each adapter by
model and module name:

- kohya's format (every key ``lora_unet_*`` / ``lora_te_*``): the module names come from the
  model itself (each possible target's kohya name), so every key either names a module of
  this model or is reported; a module without ``alpha`` gets its rank (kohya's rule);
- diffusers' format (keys ``unet.*`` / ``text_encoder.*``): peft's key names, or diffusers'
  older ones converted with diffusers' own converters; each module's alpha comes from the
  ``lora_adapter_metadata`` diffusers writes, else it is the rank (diffusers' rule).

`check_lora_init` compares the file's ranks and alphas with the run's settings and
`apply_lora_init` copies the adapters into the injected ones. Every file that does not fit
(SDXL, another architecture, other ranks or alphas, adapters where this run trains none) is one
`UserError` saying what the file holds and what to change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from torch import nn

from config.errors import UserError
from lora.adapters import (
    ADAPTER,
    PARTS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    AdapterWeights,
    file_module_name,
    named_layers,
)
from lora.files import DIFFUSERS_METADATA, DIFFUSERS_WEIGHTS, Weights, read_metadata
from lora.kohya import ALL_PREFIXES, KohyaNaming, read_kohya_tensors
from lora.settings import LoraSettings
from lora.targets import TEXT_ENCODER_BLOCKS, UNET_BLOCKS, UNET_CONV_BLOCKS, block_layers

logger = logging.getLogger(__name__)

KEY = "lora_init"
KOHYA = "kohya"
DIFFUSERS = "diffusers"
_SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "input_blocks", "output_blocks")
_BLOCKS = {
    UNET: UNET_BLOCKS + UNET_CONV_BLOCKS,
    TEXT_ENCODER: TEXT_ENCODER_BLOCKS,
    TEXT_ENCODER_2: TEXT_ENCODER_BLOCKS,
}


@dataclass(frozen=True)
class LoraFile:
    """The adapters of a LoRA file by model (``unet``/``text_encoder``) and module name."""

    path: Path
    format: str  # KOHYA or DIFFUSERS
    weights: Weights


def lora_file_path(path: Path) -> Path:
    """The file itself, or ``pytorch_lora_weights.safetensors`` of a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHTS
    if not path.is_file():
        raise UserError(f"{KEY}: {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{KEY}: {path}: a LoRA file must be a .safetensors file")
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{KEY}: {path}: not a readable safetensors file ({error})") from error


def _reject_foreign(path: Path, keys: list[str], sdxl_run: bool) -> None:
    if not keys:
        raise UserError(f"{KEY}: {path} holds no tensors")
    if sdxl_run:
        return  # an SD1.x/2.x file's keys name no module of SDXL's: reported as unknown
    sdxl = next((k for k in keys if any(marker in k for marker in _SDXL_MARKERS)), None)
    if sdxl is not None:
        raise UserError(
            f"{KEY}: {path} is an SDXL LoRA (it holds {sdxl}); this run trains an SD1.x/2.x model"
        )


def naming_of(models: Mapping[str, nn.Module]) -> KohyaNaming:
    """kohya's naming for these models: SDXL's when they are SDXL's (a second text encoder,
    or a UNet with SDXL's conditioning)."""
    if UNET in models:
        return KohyaNaming.of(models[UNET])
    return KohyaNaming(sdxl=TEXT_ENCODER_2 in models)


def possible_modules(models: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya name -> (part, module name in files) of every module kohya could adapt."""
    naming = naming_of(models)
    return {
        naming.name(part, file_module_name(part, name)): (part, file_module_name(part, name))
        for part, model in models.items()
        if part in _BLOCKS
        for name, _ in block_layers(model, _BLOCKS[part])
    }


def read_lora_file(path: Path, models: Mapping[str, nn.Module]) -> LoraFile:
    """Read ``path`` for the ``models`` it is meant for (``{"unet": ..., "text_encoder": ...}``)."""
    path = lora_file_path(path)
    tensors = _load(path)
    keys = sorted(tensors)
    _reject_foreign(path, keys, naming_of(models).sdxl)
    if all(key.startswith(tuple(f"{p}_" for p in ALL_PREFIXES)) for key in keys):
        weights, unknown = read_kohya_tensors(tensors, possible_modules(models))
        if unknown:
            raise UserError(
                f"{KEY}: {path}: {len(unknown)} keys name no LoRA module of this "
                f"{_architecture(models)} model (first: {unknown[0]}); is it a LoRA for another "
                "model, or another kind of network (LyCORIS LoHa/LoKr)?"
            )
        return LoraFile(path, KOHYA, weights)
    if all(key.startswith(tuple(f"{p}." for p in PARTS)) for key in keys):
        return LoraFile(path, DIFFUSERS, _diffusers_weights(path, tensors))
    raise UserError(
        f"{KEY}: {path} is not a LoRA file of kohya's or diffusers' format (keys such as "
        f"{keys[0]}; expected lora_unet_*/lora_te_* (SDXL: lora_te1_*/lora_te2_*) or "
        "unet.*/text_encoder.*)"
    )


def _architecture(models: Mapping[str, nn.Module]) -> str:
    if naming_of(models).sdxl:
        return "SDXL"
    encoder = models.get(TEXT_ENCODER)
    if encoder is None:
        return "SD"
    return "SD2.x" if str(encoder.config.hidden_act) == "gelu" else "SD1.x"


def _diffusers_weights(path: Path, tensors: Mapping[str, torch.Tensor]) -> Weights:
    configs = json.loads(read_metadata(path).get(DIFFUSERS_METADATA, "{}"))
    weights: Weights = {}
    for part in PARTS:
        state = {
            k.removeprefix(f"{part}."): v for k, v in tensors.items() if k.startswith(f"{part}.")
        }
        if not state:
            continue
        if not all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in state):
            state = (
                convert_unet_state_dict_to_peft(state)
                if part == UNET
                else convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
            )
        config = {
            k.removeprefix(f"{part}."): v for k, v in configs.items() if k.startswith(f"{part}.")
        }
        weights[part] = _peft_modules(path, part, state, config)
    return weights


def _peft_modules(
    path: Path, part: str, state: Mapping[str, torch.Tensor], config: Mapping[str, object]
) -> dict[str, AdapterWeights]:
    """peft keys (``<module>.lora_A.weight``) as module name -> adapter, alphas resolved."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".lora_")
        if key.endswith(".alpha"):
            module, suffix = key.removesuffix(".alpha"), "alpha"
        if suffix not in ("A.weight", "B.weight", "alpha"):
            raise UserError(f"{KEY}: {path}: {part}.{key} is not part of a LoRA adapter")
        groups.setdefault(file_module_name(part, module), {})[suffix] = tensor
    modules = {}
    for module, parts in groups.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            raise UserError(f"{KEY}: {path}: {part}.{module} lacks lora_A or lora_B")
        rank = int(parts["A.weight"].shape[0])
        alpha = float(parts["alpha"].item()) if "alpha" in parts else _alpha(module, rank, config)
        modules[module] = AdapterWeights(parts["A.weight"], parts["B.weight"], alpha)
    return modules


def _alpha(module: str, rank: int, config: Mapping[str, object]) -> float:
    """A module's alpha from diffusers' metadata (peft's pattern rules), else its rank."""
    if "lora_alpha" not in config:
        return float(rank)
    patterns = dict(config.get("alpha_pattern") or {})  # type: ignore[call-overload]
    key = get_pattern_key(list(patterns), module)
    return float(patterns.get(key, config["lora_alpha"]))  # type: ignore[arg-type]


# --- fitting the file to the run -------------------------------------------------------------


def _is_conv3x3(adapter: AdapterWeights) -> bool:
    return adapter.down.ndim == 4 and tuple(adapter.down.shape[2:]) != (1, 1)


def _kinds(file: LoraFile) -> dict[bool, set[tuple[int, float]]]:
    """(rank, alpha) pairs of the file's 3x3 convolution adapters (True) and the others."""
    kinds: dict[bool, set[tuple[int, float]]] = {True: set(), False: set()}
    for modules in file.weights.values():
        for adapter in modules.values():
            kinds[_is_conv3x3(adapter)].add((adapter.rank, adapter.alpha))
    return kinds


def check_lora_init(file: LoraFile, settings: LoraSettings) -> None:
    """The file's ranks and alphas must be the run's: a `UserError` names the keys to set."""
    kinds = _kinds(file)
    for conv, (rank_key, alpha_key, rank, alpha) in (
        (False, ("lora_rank", "lora_alpha", settings.rank, settings.alpha)),
        (True, ("lora_conv_rank", "lora_conv_alpha", settings.conv_rank, settings.conv_alpha)),
    ):
        pairs = sorted(kinds[conv])
        what = "3x3 convolution adapters (LoCon)" if conv else "adapters"
        if len(pairs) > 1:
            raise UserError(
                f"{KEY}: {file.path}: its {what} have several ranks and alphas {pairs}; training "
                "can continue only from a file with one rank and alpha for each kind"
            )
        if pairs and pairs[0] != (rank, alpha):
            file_rank, file_alpha = pairs[0]
            raise UserError(
                f"{KEY}: {file.path}: its {what} have rank {file_rank} and alpha "
                f"{file_alpha:g}, this run's {rank} and {alpha:g}: set {rank_key}: {file_rank} "
                f"and {alpha_key}: {file_alpha:g}"
            )


def apply_lora_init(file: LoraFile, models: Mapping[str, nn.Module]) -> int:
    """Copy the file's adapters into the models' (after `lora.inject`); returns how many.

    Every adapter of the file must have a module with an adapter of the same shapes in this
    run. Adapters of the run that the file lacks keep their fresh start (no effect yet).
    """
    possible = {name for _, name in possible_modules(models).values()}
    loaded = 0
    for part, modules in file.weights.items():
        layers = named_layers(part, models[part]) if part in models else {}
        for module, adapter in modules.items():
            if module not in layers:
                raise UserError(_no_adapter_message(file, part, module, module in possible))
            _copy_into(file, part, module, adapter, layers[module])
            loaded += 1
    total = sum(len(named_layers(part, model)) for part, model in models.items())
    if loaded < total:
        logger.warning(
            "%s: %s holds %d of this run's %d adapters; the others start fresh",
            KEY,
            file.path,
            loaded,
            total,
        )
    logger.info("%s: %d adapters loaded from %s (%s format)", KEY, loaded, file.path, file.format)
    return loaded


def _no_adapter_message(file: LoraFile, part: str, module: str, possible: bool) -> str:
    if not possible:
        return (
            f"{KEY}: {file.path}: {part} module {module} is not in this model: a LoRA for "
            "another model?"
        )
    return (
        f"{KEY}: {file.path}: it adapts {part} module {module}, which trains no adapter in "
        "this run (disable_textenc_training / disable_unet_training, a frozen text-encoder "
        "layer, or lora_conv_rank 0 for a convolution)"
    )


def _copy_into(
    file: LoraFile, part: str, module: str, adapter: AdapterWeights, layer: LoraLayer
) -> None:
    down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    if adapter.down.shape != down.shape or adapter.up.shape != up.shape:
        raise UserError(
            f"{KEY}: {file.path}: {part} module {module} has adapter shapes "
            f"{tuple(adapter.down.shape)} / {tuple(adapter.up.shape)}, this model's "
            f"{tuple(down.shape)} / {tuple(up.shape)}: a LoRA for another model (SD1.x / SD2.x)?"
        )
    with torch.no_grad():
        down.copy_(adapter.down)
        up.copy_(adapter.up)
