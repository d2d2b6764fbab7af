"""Checkpoints: a diffusers pipeline folder, plus the training state that resumes a run.

A checkpoint folder is what ``StableDiffusionPipeline.save_pretrained`` writes (safetensors,
no safety checker), so ``StableDiffusionPipeline.from_pretrained(path)`` and
`models.load_models` load it as it is. A ``dreamtrainer.json`` beside ``model_index.json``
names the run that wrote it (so that one run never replaces another run's checkpoint). A
resumable checkpoint also holds ``training_state/`` (see `training.checkpointing.state`), with
fp32 copies of the models that train when the pipeline files are fp16. Frozen models are never
copied: when fp16 would round them, the state records where their exact weights are (the run's
base model, with a SHA-256 of the weights) and resuming loads them from there.

Saving is atomic (`storage.atomic`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from config.errors import UserError
from lora.merge import merged_bundle
from models import ModelBundle
from models.bundle import COMPONENTS
from models.pipeline_folder import write_pipeline_folder
from models.single_file import write_single_file
from storage.atomic import atomic_folder, write_error
from training.checkpointing.lora_writer import (
    is_lora_checkpoint,
    merged_path,
    save_lora_checkpoint,
)
from training.checkpointing.names import CLAIM_FILE
from training.checkpointing.options import SaveOptions
from training.checkpointing.state import (
    STATE_DIR,
    TrainingState,
    read_state_json,
    unreadable,
    write_training_state,
)

logger = logging.getLogger(__name__)

# Components whose weights a checkpoint holds, as named in the pipeline folder and the bundle.

TRAINABLE = ("unet", "text_encoder")
# The file that marks a folder as a diffusers pipeline (and so as replaceable by a new save).
PIPELINE_MARKER = "model_index.json"
# This trainer's note in each checkpoint: which run wrote it, at which step.
RUN_MARKER = "dreamtrainer.json"
WHAT = "checkpoint"


def save_checkpoint(
    path: Path,
    bundle: ModelBundle,
    state: TrainingState | None = None,
    options: SaveOptions = SaveOptions(),
) -> Path:
    """Write a checkpoint folder at ``path`` atomically; returns ``path``.

    The pipeline weights are fp16 unless ``options.full_precision`` (then fp32). The models in
    ``bundle`` are left as they are (dtype, device, values): fp16 weights are written from CPU
    copies. With a ``state``, ``training_state/`` is written too, with fp32 copies of the models
    it has optimizers for when the pipeline is fp16. ``options.note`` is written to
    ``dreamtrainer.json``. With ``options.single_file``, ``<path>.safetensors`` (LDM layout, see
    `models.single_file`) is written beside the folder once the folder is in place.

    With ``options.lora`` the checkpoint holds the adapters, not the models
    (`training.checkpointing.lora_writer`), and with its ``merge`` the merged model is written
    beside it as a full checkpoint.

    An existing checkpoint at ``path`` is replaced only once the new one is complete. A folder
    at ``path`` that is not a checkpoint is never replaced. Any OS error while writing (an
    unwritable folder, a full disk) is a `UserError` naming the path and the reason; the
    temporary folder is removed and a previous checkpoint at ``path`` stays as it was.
    """
    path = Path(path)
    _check_target(path)
    if options.lora is not None:
        return _save_lora(path, bundle, state, options)
    started = time.monotonic()
    full_precision = options.full_precision
    try:
        with atomic_folder(path, WHAT) as temp:
            write_pipeline_folder(temp, bundle, full_precision)
            if options.note is not None:
                (temp / RUN_MARKER).write_text(json.dumps(options.note, indent=2) + "\n", "utf-8")
            if state is not None:
                _write_training_state(temp / STATE_DIR, bundle, state, full_precision)
    except SafetensorError as error:
        raise write_error(path, error, WHAT) from error
    if options.single_file:
        write_single_file(path.with_name(f"{path.name}.safetensors"), bundle, full_precision)
    logger.info(
        "checkpoint written to %s in %.1f s (%s weights%s)",
        path,
        time.monotonic() - started,
        "fp32" if full_precision else "fp16",
        ", resumable" if state is not None else "",
    )
    return path


def _save_lora(
    path: Path, bundle: ModelBundle, state: TrainingState | None, options: SaveOptions
) -> Path:
    """A LoRA checkpoint, and with ``lora_merge`` the merged model beside it."""
    assert options.lora is not None
    save_lora_checkpoint(path, bundle, state, options.lora, options)
    if options.lora.merge:
        plain = dataclasses.replace(options, lora=None)
        save_checkpoint(merged_path(path), merged_bundle(bundle), None, plain)
    return path


def checkpoint_note(path: Path) -> dict[str, Any] | None:
    """The ``dreamtrainer.json`` of checkpoint ``path``, or None (none, or unreadable)."""
    try:
        note = json.loads((Path(path) / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _check_target(path: Path) -> None:
    """Refuse a target that exists and is not a checkpoint (or a folder claimed for one)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"cannot write the checkpoint {path}: it exists and is not a folder")
    contents = [p for p in path.iterdir() if p.name != CLAIM_FILE] if path.is_dir() else []
    if contents and not (path / PIPELINE_MARKER).is_file() and not is_lora_checkpoint(path):
        raise UserError(
            f"cannot write the checkpoint {path}: that folder exists and is not a checkpoint "
            f"(no {PIPELINE_MARKER}); it is left alone. Move it or choose another save_ckpt_dir"
        )


def rounded_by_fp16(model: torch.nn.Module) -> bool:
    """Whether writing ``model`` in fp16 would change any of its weights."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point() and not torch.equal(
            tensor, tensor.to(torch.float16).to(tensor.dtype)
        ):
            return True
    return False


def _write_training_state(
    folder: Path, bundle: ModelBundle, state: TrainingState, full_precision: bool
) -> None:
    """The training state, with fp32 copies of the models it has optimizers for (fp16 files)."""
    folder.mkdir()
    unknown = set(state.optimizers) - set(TRAINABLE)
    assert not unknown, f"optimizers of {sorted(unknown)}: not among {TRAINABLE}"
    copies = [] if full_precision else [n for n in COMPONENTS if n in state.optimizers]
    for name in copies:
        safetensors.torch.save_model(bundle.component(name), str(folder / f"{name}.safetensors"))
    write_training_state(folder, state, copies)


# --- exact weights of frozen models ----------------------------------------------------------


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every tensor of ``model`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def frozen_weights_reference(
    bundle: ModelBundle, trained: tuple[str, ...], source: str
) -> dict[str, Any] | None:
    """Where the exact weights of the frozen models that fp16 rounds are: ``source``.

    None when every frozen model is exact in fp16 (nothing to restore on resume).
    """
    digests = {
        name: weights_sha256(bundle.component(name))
        for name in COMPONENTS
        if name not in trained and rounded_by_fp16(bundle.component(name))
    }
    return {"source": source, "sha256": digests} if digests else None


def restore_full_precision_weights(path: Path, bundle: ModelBundle) -> None:
    """Make the bundle loaded from checkpoint ``path`` exactly what was saved.

    Loads the fp32 copies in ``path/training_state/`` into the trained models, and the frozen
    models that the fp16 pipeline rounded from the run's base model (when it is still there and
    its weights are the same; otherwise a warning says the resumed run uses the rounded ones).
    Call it after ``load_models(path)``.
    """
    path = Path(path)
    document = read_state_json(path)
    names = document.get("full_precision_weights", [])
    if not isinstance(names, list) or not set(names) <= set(COMPONENTS):
        raise unreadable(path, f"full_precision_weights is {names!r}")
    for name in names:
        model = bundle.component(name)
        file = path / STATE_DIR / f"{name}.safetensors"
        device = next(model.parameters()).device
        try:
            safetensors.torch.load_model(model, str(file), strict=True, device=str(device))
        except (OSError, SafetensorError, RuntimeError) as error:
            raise unreadable(path, f"{file}: {error}") from error
        logger.info("restored the fp32 weights of %s from %s", name, file)
    frozen = document.get("frozen_weights")
    if isinstance(frozen, dict) and frozen.get("sha256"):
        _restore_frozen(frozen, bundle)


def _restore_frozen(frozen: dict[str, Any], bundle: ModelBundle) -> None:
    from models import load_models

    source, digests = str(frozen.get("source")), dict(frozen["sha256"])
    try:
        base = load_models(source)
    except (UserError, OSError) as error:
        logger.warning(
            "the exact weights of frozen %s are in %s, which cannot be loaded (%s): resuming "
            "with their fp16-rounded copies, so the run is not bit-exact",
            ", ".join(digests),
            source,
            error,
        )
        return
    for name, digest in digests.items():
        model = base.component(name)
        if weights_sha256(model) != digest:
            logger.warning(
                "%s in %s changed since the run started: resuming with the checkpoint's "
                "fp16-rounded %s, so the run is not bit-exact",
                name,
                source,
                name,
            )
            continue
        bundle.component(name).load_state_dict(model.state_dict())
        logger.info("restored the exact weights of frozen %s from %s", name, source)
