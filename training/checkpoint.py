"""Checkpoints (SPEC §9): a diffusers pipeline folder, plus the training state that resumes a run.

A checkpoint folder is what ``StableDiffusionPipeline.save_pretrained`` writes (safetensors,
no safety checker), so ``StableDiffusionPipeline.from_pretrained(path)`` and
`models.load_models` load it as it is. A resumable checkpoint also holds ``training_state/``:

- ``state.json``: format version, epoch, batch in epoch, optimizer step, seed, the optimizer
  fingerprint and counters, and which components have fp32 copies;
- ``state.pt``: optimizer, LR-scheduler and grad-scaler state dicts and RNG states
  (``torch.save``; read back with ``torch.load(weights_only=True)``, which unpickles only
  tensors and plain containers: no code runs when a checkpoint is loaded);
- ``<component>.safetensors``: fp32 weights of the components that the fp16 pipeline files
  would round, so that resuming continues bit for bit.

Saving is atomic: everything is written into a hidden sibling folder
``.<name>.partial-<pid>-<random>``, flushed to disk, then renamed to ``<name>``; an older
checkpoint of the same name is moved aside (``.<name>.old-<pid>-<random>``) and deleted only
once the new one is in place.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError

from config.errors import UserError
from models import ModelBundle
from models.single_file import write_single_file
from models.text_keys import standardize_text_encoder_file

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
STATE_JSON = "state.json"
STATE_TENSORS = "state.pt"
FORMAT_VERSION = 1

# Components whose weights a checkpoint holds, as named in the pipeline folder and the bundle.
COMPONENTS = ("unet", "text_encoder", "vae")
TRAINABLE = ("unet", "text_encoder")
# The file that marks a folder as a diffusers pipeline (and so as replaceable by a new save).
PIPELINE_MARKER = "model_index.json"

_PARTIAL = "partial"
_OLD = "old"


@dataclass
class TrainingState:
    """Everything besides the weights that a run needs to continue exactly."""

    epoch: int  # epoch in progress, 0-based
    batch_in_epoch: int  # batches of that epoch already consumed (resume skips them)
    global_step: int  # optimizer steps done
    seed: int  # the run's resolved seed (data order is a pure function of seed and epoch)
    optimizers: dict[str, dict]  # model name -> optimizer.state_dict() (trained models only)
    schedulers: dict[str, dict]  # same keys -> lr_scheduler.state_dict()
    grad_scaler: dict | None  # torch.amp.GradScaler.state_dict(), or None without one
    rng: dict[str, Any]  # RNG states: tensors, lists, tuples, numbers (see `save_checkpoint`)
    fingerprint: dict[str, Any]  # JSON-able; must match the resuming run (`check_fingerprint`)
    counters: dict[str, Any]  # JSON-able extras (non-finite losses, images seen, ...)


# --- saving ---------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    bundle: ModelBundle,
    state: TrainingState | None,
    full_precision: bool,
    trained: tuple[str, ...] = TRAINABLE,
    single_file: bool = False,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically; returns ``path``.

    With ``single_file``, ``<path>.safetensors`` (LDM layout, see `models.single_file`) is
    written beside the folder once the folder is in place.

    The pipeline weights are fp16 unless ``full_precision`` (then fp32). The models in ``bundle``
    are left as they are (dtype, device, values): fp16 weights are written from CPU copies.
    With a ``state``, ``training_state/`` is written too, with fp32 copies of the ``trained``
    models and of any other component that fp16 would round, when the pipeline is fp16.
    ``state.optimizers`` etc. may hold only what ``torch.load(weights_only=True)`` reads back
    (tensors, numbers, strings, None, lists, tuples, dicts); anything else is a TypeError here.

    An existing checkpoint at ``path`` is replaced only once the new one is complete. A folder
    at ``path`` that is not a checkpoint is never replaced. Any OS error while writing (an
    unwritable folder, a full disk) is a `UserError` naming the path and the reason; the temporary
    folder is removed and a previous checkpoint at ``path`` stays as it was.
    """
    path = Path(path)
    unknown = set(trained) - set(TRAINABLE)
    assert not unknown, f"trained names {sorted(unknown)} are not among {TRAINABLE}"
    started = time.monotonic()
    _check_target(path)
    _recover_leftovers(path)
    try:
        temp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path, _PARTIAL), dir=path.parent))
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        _write_pipeline(temp, bundle, full_precision)
        if state is not None:
            _write_training_state(temp / STATE_DIR, bundle, state, full_precision, trained)
        _sync_tree(temp)
        _move_into_place(temp, path)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise _write_error(path, error) from error
        raise
    if single_file:
        write_single_file(path.with_name(f"{path.name}.safetensors"), bundle, full_precision)
    logger.info(
        "checkpoint written to %s in %.1f s (%s weights%s)",
        path, time.monotonic() - started, "fp32" if full_precision else "fp16",
        ", resumable" if state is not None else "",
    )  # fmt: skip
    return path


def _write_error(path: Path, error: BaseException) -> UserError:
    if isinstance(error, OSError) and error.strerror is not None:
        where = f" ({error.filename})" if error.filename is not None else ""
        reason = f"{error.strerror}{where}"
    else:
        reason = str(error)
    return UserError(
        f"cannot write the checkpoint {path}: {reason}. Check that the folder is writable and "
        f"the disk has room (save_ckpt_dir / logdir); any earlier checkpoint there is unchanged"
    )


def _check_target(path: Path) -> None:
    """Create the parent folder; refuse a target that exists and is not a checkpoint."""
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write the checkpoint {path}: {existing} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(path, error) from error
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"cannot write the checkpoint {path}: it exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / PIPELINE_MARKER).is_file():
        raise UserError(
            f"cannot write the checkpoint {path}: that folder exists and is not a checkpoint "
            f"(no {PIPELINE_MARKER}); it is left alone. Move it or choose another save_ckpt_dir"
        )


def _sibling_prefix(path: Path, kind: str, pid: int | None = None) -> str:
    return f".{path.name}.{kind}-{os.getpid() if pid is None else pid}-"


def _recover_leftovers(path: Path) -> None:
    """Tidy what a process killed mid-save left beside ``path``.

    A partial folder is deleted. An old checkpoint moved aside is put back when nothing is at
    ``path`` (the process died between the two renames) and deleted otherwise. Folders of a
    process that is still running are left alone.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({_PARTIAL}|{_OLD})-(\d+)-[^/]*")
    for sibling in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(sibling.name)
        if match is None or not sibling.is_dir() or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == _OLD and not path.exists():
            logger.warning("restoring the previous checkpoint %s from %s", path, sibling)
            sibling.rename(path)
        else:
            logger.warning("removing %s, left by an interrupted checkpoint save", sibling)
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():  # a previous process with the same id (e.g. pid 1 in a container)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(temp: Path, path: Path) -> None:
    """Rename ``temp`` to ``path``; an older checkpoint there is deleted only afterwards.

    While it is moved aside, the older checkpoint has a ``.old-`` name that
    `_recover_leftovers` puts back if the process dies before the new one is in place.
    """
    old = None
    if path.exists():
        old = path.with_name(f"{_sibling_prefix(path, _OLD)}{secrets.token_hex(4)}")
        path.rename(old)
    temp.rename(path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_pipeline(folder: Path, bundle: ModelBundle, full_precision: bool) -> None:
    """The diffusers pipeline folder, in fp32 or fp16, from the bundle's models untouched."""
    dtype = torch.float32 if full_precision else torch.float16
    pipeline = StableDiffusionPipeline(
        vae=_in_dtype(bundle.vae, dtype),
        text_encoder=_in_dtype(bundle.text_encoder, dtype),
        tokenizer=bundle.tokenizer,
        unet=_in_dtype(bundle.unet, dtype),
        # A copy: the pipeline's constructor may rewrite an old-style scheduler config in place.
        scheduler=type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    standardize_text_encoder_file(pipeline.text_encoder, folder / "text_encoder")
    if dtype != torch.float32:
        _default_load_dtype_float32(folder / "text_encoder" / "config.json")


def _default_load_dtype_float32(config_file: Path) -> None:
    """Make ``from_pretrained`` load the fp16 text encoder in fp32 unless told otherwise.

    transformers loads in the config's ``dtype`` by default, diffusers in fp32: without this a
    plain ``StableDiffusionPipeline.from_pretrained(path)`` would mix fp16 and fp32 and fail.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _floating_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


def _in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` itself when already all ``dtype``, else a CPU copy in ``dtype``.

    The copy is built on the meta device and takes CPU tensors converted one by one, so no
    second full-precision copy and no device memory are needed.
    """
    if _floating_dtypes(model) <= {dtype}:
        return model
    with torch.device("meta"):
        if hasattr(model.config, "to_dict"):  # transformers
            clone = type(model)(copy.deepcopy(model.config))
        else:  # diffusers
            clone = type(model).from_config(model.config)
    weights = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
        for name, tensor in model.state_dict().items()
    }
    clone.load_state_dict(weights, strict=True, assign=True)
    return clone.eval()


def _rounded_by_fp16(model: torch.nn.Module) -> bool:
    """Whether writing ``model`` in fp16 would change any of its weights."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point() and not torch.equal(
            tensor, tensor.to(torch.float16).to(tensor.dtype)
        ):
            return True
    return False


def _write_training_state(
    folder: Path,
    bundle: ModelBundle,
    state: TrainingState,
    full_precision: bool,
    trained: tuple[str, ...],
) -> None:
    folder.mkdir()
    copies: list[str] = []
    if not full_precision:
        copies = [
            name
            for name in COMPONENTS
            if name in trained or _rounded_by_fp16(getattr(bundle, name))
        ]
    for name in copies:
        safetensors.torch.save_model(getattr(bundle, name), str(folder / f"{name}.safetensors"))
    tensors = {
        "optimizers": state.optimizers,
        "schedulers": state.schedulers,
        "grad_scaler": state.grad_scaler,
        "rng": state.rng,
    }
    _torch_save(tensors, folder / STATE_TENSORS)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / STATE_TENSORS))
    if unsafe:
        raise TypeError(
            f"the training state holds objects that torch.load(weights_only=True) will not "
            f"read back: {', '.join(unsafe)}; store tensors, numbers, strings and containers"
        )
    document = {
        "format_version": FORMAT_VERSION,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "global_step": state.global_step,
        "seed": state.seed,
        "fingerprint": state.fingerprint,
        "counters": state.counters,
        "full_precision_weights": copies,
    }
    (folder / STATE_JSON).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


class _RecordingWriter(io.RawIOBase):
    """A file wrapper that keeps the OSError of a failed write.

    ``torch.save`` turns write errors into an opaque RuntimeError; this keeps the OS reason
    (e.g. no space left on device) for the user's message.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, file: Path) -> None:
    with open(file, "wb") as raw:
        writer = _RecordingWriter(raw)
        try:
            torch.save(obj, writer)
        except RuntimeError as error:
            if writer.error is not None:
                raise writer.error from error
            raise


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, so a rename never exposes empty files."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- loading --------------------------------------------------------------------------------


def has_training_state(path: Path) -> bool:
    """Whether the checkpoint folder ``path`` is resumable (holds ``training_state/``)."""
    return (Path(path) / STATE_DIR / STATE_JSON).is_file()


def _unreadable(path: Path, what: str) -> UserError:
    return UserError(
        f"resume_ckpt: the training state in {path} cannot be read: {what}. To start a new run "
        f"from its weights, copy the folder without its {STATE_DIR}/ subfolder and set "
        f"resume_ckpt to the copy"
    )


def _read_state_json(path: Path) -> dict[str, Any]:
    file = Path(path) / STATE_DIR / STATE_JSON
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(path, f"{file}: {error}") from error
    if not isinstance(document, dict):
        raise _unreadable(path, f"{file} does not hold a JSON object")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise _unreadable(
            path,
            f"{file} has format_version {version!r}; this trainer reads version {FORMAT_VERSION}",
        )
    return document


def load_training_state(path: Path) -> TrainingState:
    """The training state of checkpoint ``path`` (tensors on the CPU); `UserError` if unusable."""
    path = Path(path)
    document = _read_state_json(path)
    file = path / STATE_DIR / STATE_TENSORS
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise _unreadable(path, f"{file}: {error}") from error
    try:
        state = TrainingState(
            epoch=_int(document, "epoch"),
            batch_in_epoch=_int(document, "batch_in_epoch"),
            global_step=_int(document, "global_step"),
            seed=_int(document, "seed"),
            optimizers=_mapping(tensors, "optimizers"),
            schedulers=_mapping(tensors, "schedulers"),
            grad_scaler=tensors["grad_scaler"],
            rng=_mapping(tensors, "rng"),
            fingerprint=_mapping(document, "fingerprint"),
            counters=_mapping(document, "counters"),
        )
    except (KeyError, TypeError) as error:
        raise _unreadable(path, f"missing or malformed entry {error}") from error
    return state


def _int(document: dict[str, Any], key: str) -> int:
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{key}' (not an integer)")
    return value


def _mapping(document: Any, key: str) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise TypeError(f"'{key}' (the file holds no mapping)")
    value = document[key]
    if not isinstance(value, dict):
        raise TypeError(f"'{key}' (not a mapping)")
    return value


def restore_full_precision_weights(path: Path, bundle: ModelBundle) -> None:
    """Load the fp32 copies in ``path/training_state/`` (if any) into the bundle's models.

    Call it after ``load_models(path)``: the pipeline files may be fp16, the copies are exact.
    """
    path = Path(path)
    document = _read_state_json(path)
    names = document.get("full_precision_weights", [])
    if not isinstance(names, list) or not set(names) <= set(COMPONENTS):
        raise _unreadable(path, f"full_precision_weights is {names!r}")
    for name in names:
        model = getattr(bundle, name)
        file = path / STATE_DIR / f"{name}.safetensors"
        device = next(model.parameters()).device
        try:
            safetensors.torch.load_model(model, str(file), strict=True, device=str(device))
        except (OSError, SafetensorError, RuntimeError) as error:
            raise _unreadable(path, f"{file}: {error}") from error
        logger.info("restored the fp32 weights of %s from %s", name, file)


# --- fingerprint ----------------------------------------------------------------------------


def check_fingerprint(state: TrainingState, expected: dict[str, Any], path: Path) -> None:
    """`UserError` listing how the checkpoint's optimizer fingerprint differs from ``expected``.

    A fingerprint maps each model ("unet", "text_encoder") to None (not trained) or to a dict
    such as ``{"optimizer": "adamw8bit", "trainable_parameters": 123}``.
    """
    problems = list(_differences(state.fingerprint, expected))
    if not problems:
        return
    lines = "\n".join(f"  - {problem}" for problem in problems)
    raise UserError(
        f"resume_ckpt: the training state in {path} does not match the current optimizer "
        f"settings:\n{lines}\nResume with the settings it was made with, or start a new run "
        f"from its weights: copy the folder without its {STATE_DIR}/ subfolder and set "
        f"resume_ckpt to the copy"
    )


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> Iterator[str]:
    names = list(saved) + [name for name in now if name not in saved]
    for name in names:
        was, current = saved.get(name), now.get(name)
        if was == current:
            continue
        if not isinstance(was, dict) or not isinstance(current, dict):
            yield _trained_difference(name, was, current)
            continue
        keys = list(was) + [key for key in current if key not in was]
        for key in keys:
            before, after = was.get(key), current.get(key)
            if before == after:
                continue
            if key == "optimizer":
                yield (
                    f"the training state was made with optimizer '{before}' for {name}; the "
                    f"current settings say '{after}'"
                )
            elif key == "trainable_parameters":
                yield (
                    f"{name} had {before} trainable parameters, now {after} (did "
                    f"text_encoder_freezing or the model change?)"
                )
            else:
                yield f"{name}.{key} was {before!r}, now {after!r}"


def _trained_difference(name: str, was: Any, current: Any) -> str:
    def describe(entry: Any) -> str:
        if isinstance(entry, dict):
            return f"trained with optimizer '{entry.get('optimizer')}'"
        return "not trained"

    return f"{name} was {describe(was)} in the checkpoint, now {describe(current)}"
