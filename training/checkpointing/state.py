"""The training state of a resumable checkpoint: its format on disk, reading it, and checking it.

``<checkpoint>/training_state/`` holds:

- ``state.json``: format version, epoch, batch in epoch, optimizer step, seed, the optimizer
  fingerprint, counters, which components have fp32 copies, and where frozen weights that the
  fp16 pipeline rounds can be found exactly (``frozen_weights``);
- ``state.pt``: optimizer, LR-scheduler and grad-scaler state dicts, RNG states and the state of
  the trainer's components (EMA weights, ...), written with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers: no code
  runs when a checkpoint is loaded;
- ``<component>.safetensors``: fp32 copies of the trained models (see
  `training.checkpointing.writer`).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from config.errors import UserError

STATE_DIR = "training_state"
STATE_JSON = "state.json"
STATE_TENSORS = "state.pt"
FORMAT_VERSION = 1


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
    rng: dict[str, Any]  # RNG states: tensors, lists, tuples, numbers
    fingerprint: dict[str, Any]  # JSON-able; must match the resuming run (`check_fingerprint`)
    counters: dict[str, Any]  # JSON-able extras (non-finite losses, images seen, ...)
    components: dict[str, Any] = field(default_factory=dict)  # component name -> its state
    # JSON-able: {"source": model, "sha256": {component: digest}} for frozen components whose
    # exact weights are in the run's base model rather than in this checkpoint; None: none.
    frozen_weights: dict[str, Any] | None = None


def write_training_state(folder: Path, state: TrainingState, fp32_copies: list[str]) -> None:
    """``state.json`` and ``state.pt`` into ``folder`` (which exists).

    ``state``'s tensor parts may hold only what ``torch.load(weights_only=True)`` reads back
    (tensors, numbers, strings, None, lists, tuples, dicts); anything else is a TypeError.
    """
    tensors = {
        "optimizers": state.optimizers,
        "schedulers": state.schedulers,
        "grad_scaler": state.grad_scaler,
        "rng": state.rng,
        "components": state.components,
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
        "full_precision_weights": fp32_copies,
        "frozen_weights": state.frozen_weights,
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


# --- reading --------------------------------------------------------------------------------


def has_training_state(path: Path) -> bool:
    """Whether the checkpoint folder ``path`` has a ``training_state/`` (whole or not).

    A folder that has one but lacks a file in it is not a plain-weights folder: `read_state_json`
    and `load_training_state` then raise a `UserError` naming what is missing.
    """
    return (Path(path) / STATE_DIR).exists()


def unreadable(path: Path, what: str) -> UserError:
    """The user's message for a training state that cannot be used."""
    return UserError(
        f"resume_ckpt: the training state in {path} cannot be read: {what}. To start a new run "
        f"from its weights, copy the folder without its {STATE_DIR}/ subfolder and set "
        f"resume_ckpt to the copy"
    )


def read_state_json(path: Path) -> dict[str, Any]:
    """The checked ``state.json`` of checkpoint ``path``; `UserError` if missing or unusable."""
    folder = Path(path) / STATE_DIR
    missing = [name for name in (STATE_JSON, STATE_TENSORS) if not (folder / name).is_file()]
    if missing:
        raise unreadable(path, f"{folder} lacks {' and '.join(missing)} (a partial training state)")
    file = folder / STATE_JSON
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unreadable(path, f"{file}: {error}") from error
    if not isinstance(document, dict):
        raise unreadable(path, f"{file} does not hold a JSON object")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise unreadable(
            path,
            f"{file} has format_version {version!r}; this trainer reads version {FORMAT_VERSION}",
        )
    return document


def load_training_state(path: Path) -> TrainingState:
    """The training state of checkpoint ``path`` (tensors on the CPU); `UserError` if unusable."""
    path = Path(path)
    document = read_state_json(path)
    file = path / STATE_DIR / STATE_TENSORS
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise unreadable(path, f"{file}: {error}") from error
    try:
        frozen = document.get("frozen_weights")
        if frozen is not None and not isinstance(frozen, dict):
            raise TypeError("'frozen_weights' (not a mapping)")
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
            components=_mapping(tensors, "components") if "components" in tensors else {},
            frozen_weights=frozen,
        )
    except (KeyError, TypeError) as error:
        raise unreadable(path, f"missing or malformed entry {error}") from error
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
            if before != after:
                yield _key_difference(name, key, before, after)


def _key_difference(name: str, key: str, before: Any, after: Any) -> str:
    if key == "optimizer":
        return (
            f"the training state was made with optimizer '{before}' for {name}; the current "
            f"settings say '{after}'"
        )
    if key == "trainable_parameters":
        return (
            f"{name} had {before} trainable parameters, now {after} (did text_encoder_freezing "
            f"or the model change?)"
        )
    return f"{name}.{key} was {before!r}, now {after!r}"


def _trained_difference(name: str, was: Any, current: Any) -> str:
    def describe(entry: Any) -> str:
        if isinstance(entry, dict):
            return f"trained with optimizer '{entry.get('optimizer')}'"
        return "not trained"

    return f"{name} was {describe(was)} in the checkpoint, now {describe(current)}"
