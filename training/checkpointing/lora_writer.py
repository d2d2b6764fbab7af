"""LoRA checkpoints: the adapters in diffusers' and kohya's formats, and the training state.

A LoRA run's checkpoint ``<name>/`` holds:

- ``pytorch_lora_weights.safetensors``: diffusers' format, so ``pipe.load_lora_weights(folder)``
  works (`lora.files.write_diffusers_file`);
- ``dreamtrainer.json``: the run that wrote it;
- ``training_state/`` (resumable checkpoints): the state of `training.checkpointing.state`,
  with ``lora.json`` (the base model and the adapters' settings) and an fp32 copy of the
  adapters of each adapted model (``<model>_lora.safetensors``), so a resume is exact whatever
  the files' precision. The base model is not copied: resuming loads it from where the run
  started.

Beside it, ``<name>.safetensors`` is the kohya-format file for AUTOMATIC1111, ComfyUI and Forge
(unless ``no_save_ckpt``), and with ``lora_merge`` ``<name>-merged/`` (and its single file) is
the base model with the adapters merged, as a full fine-tune writes it. Every file is read back
and compared with the adapters in memory when it is written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from torch import nn

from config.errors import UserError
from lora.adapters import adapter_state_dict, has_adapters, load_adapter_state_dict
from lora.files import DIFFUSERS_WEIGHTS, write_diffusers_file, write_kohya_file
from lora.kohya import KohyaNaming
from models import ModelBundle
from storage.atomic import atomic_folder, write_error
from training.checkpointing.options import LoraExport, SaveOptions
from training.checkpointing.state import STATE_DIR, TrainingState, write_training_state

logger = logging.getLogger(__name__)

LORA_JSON = "lora.json"
MERGED_SUFFIX = "-merged"
WHAT = "LoRA checkpoint"


def adapted_models(bundle: ModelBundle) -> dict[str, nn.Module]:
    """The bundle's models by name, as LoRA files name them (only those that have adapters)."""
    return {name: model for name, model in bundle.named_models().items() if has_adapters(model)}


def is_lora_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a folder written by `save_lora_checkpoint`."""
    return (Path(path) / DIFFUSERS_WEIGHTS).is_file()


def save_lora_checkpoint(
    path: Path,
    bundle: ModelBundle,
    state: TrainingState | None,
    export: LoraExport,
    options: SaveOptions,
) -> Path:
    """Write the LoRA checkpoint ``path`` (see the module's docstring); returns ``path``.
    The merged model (``lora_merge``) is the caller's (`training.checkpointing.writer`)."""
    path = Path(path)
    started = time.monotonic()
    models = adapted_models(bundle)
    full_precision = options.full_precision
    try:
        with atomic_folder(path, WHAT) as temp:
            write_diffusers_file(temp, models, full_precision)
            if options.note is not None:
                note = json.dumps(options.note, indent=2) + "\n"
                (temp / "dreamtrainer.json").write_text(note, "utf-8")
            if state is not None:
                _write_state(temp / STATE_DIR, models, state, export)
    except SafetensorError as error:
        raise write_error(path, error, WHAT) from error
    if options.single_file:
        note = options.note or {}
        info = export.kohya_info(path.name, int(note.get("epoch", 0)), note.get("global_step", 0))
        kohya = path.with_name(f"{path.name}.safetensors")
        naming = KohyaNaming.of(bundle.unet)
        write_kohya_file(kohya, models, export.settings, info, full_precision, naming)
    logger.info(
        "LoRA checkpoint written to %s in %.1f s (%s adapters%s)",
        path,
        time.monotonic() - started,
        "fp32" if full_precision else "fp16",
        ", resumable" if state is not None else "",
    )
    return path


def merged_path(path: Path) -> Path:
    """Where ``lora_merge`` writes the merged model of checkpoint ``path``."""
    return Path(path).with_name(f"{Path(path).name}{MERGED_SUFFIX}")


def _write_state(
    folder: Path, models: dict[str, nn.Module], state: TrainingState, export: LoraExport
) -> None:
    folder.mkdir()
    for name, model in models.items():
        file = folder / f"{name}_lora.safetensors"
        safetensors.torch.save_file(adapter_state_dict(model), str(file))
    (folder / LORA_JSON).write_text(json.dumps(export.as_dict(), indent=2) + "\n", "utf-8")
    write_training_state(folder, state, [])


def read_lora_state(path: Path) -> dict[str, Any] | None:
    """The ``lora.json`` of a checkpoint's training state (None: not a LoRA run's)."""
    file = Path(path) / STATE_DIR / LORA_JSON
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"resume_ckpt: {file} is unreadable: {error}") from error
    if not isinstance(value, dict) or not isinstance(value.get("base_model"), str):
        raise UserError(f"resume_ckpt: {file} is malformed (no base_model)")
    return value


def restore_adapters(path: Path, models: dict[str, nn.Module]) -> None:
    """Load the fp32 adapter copies of checkpoint ``path`` into ``models`` (which have the
    same adapters); `UserError` when one is missing or does not fit."""
    for name, model in models.items():
        file = Path(path) / STATE_DIR / f"{name}_lora.safetensors"
        try:
            tensors = safetensors.torch.load_file(str(file))
            load_adapter_state_dict(model, tensors)
        except (OSError, SafetensorError, RuntimeError, KeyError, ValueError) as error:
            raise UserError(
                f"resume_ckpt: the adapters of {name} in {file} do not fit this run's "
                f"adapters ({error}); lora_rank, lora_conv_rank and the targets must be the "
                "ones the run started with"
            ) from error
        logger.info("restored the fp32 adapters of %s from %s", name, file)
