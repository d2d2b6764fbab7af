"""EveryDream2's validation settings file (``validation_config`` in train.json).

The file's keys are EveryDream2's (``validation_default.json``), declared with ``setting(...)``
so they get train.json's checks and messages: unknown keys (with the closest valid key), types,
finite numbers within bounds, paths a file system takes. Every problem of the file is reported
together, before any model loads. As EveryDream2 does, the old spellings ``val_data_root`` and
``val_split_proportion`` are read (with a warning), and so are the strings ``"true"`` and
``"false"`` for a boolean (EveryDream2's ``cfgs/validation_coco.json`` writes
``"validate_training": "true"``).

Folders named in the file are looked up in the working directory, then in the file's folder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import limits as lim
from config.errors import ConfigError
from config.fields import (
    InvalidValueError,
    check_value,
    defaults_of,
    field_types,
    parse_fields,
    rule_of,
    setting,
)
from config.jsonfile import read_json_object
from config.text import check_text, describe

logger = logging.getLogger(__name__)

WHAT = "validation config"
SPLIT_MODES = ("automatic", "manual", "none")
# TensorBoard tags are loss/<name>: these names are the trainer's own tags.
VAL_NAME = "val"
STABILIZED_NAME = "train-stabilized"
COMBINED_NAME = "_all_val_combined"
RESERVED_NAMES = (VAL_NAME, STABILIZED_NAME, COMBINED_NAME)
# EveryDream2's old spellings → the keys that replaced them.
ALIASES = {"val_data_root": "manual_data_root", "val_split_proportion": "auto_split_proportion"}
_PROPORTION = {"minimum": 0.0, "exclusive_minimum": True, "maximum": 1.0}


@dataclass(frozen=True)
class ValidationFile:
    """The keys of a validation settings file and their defaults (EveryDream2's)."""

    documentation: Any = setting(None, "Free text or an object; ignored.")
    validate_training: bool = setting(
        True,
        "Evaluate a set of images that is never trained on and log it as `loss/val`.",
    )
    val_split_mode: str = setting(
        "automatic",
        "Where `loss/val`'s images come from: automatic (held out of data_root), manual "
        "(manual_data_root) or none.",
        choices=SPLIT_MODES,
    )
    auto_split_proportion: float = setting(
        0.15,
        "automatic: the share of data_root's images held out of training (at least one "
        "image). Also spelled val_split_proportion.",
        **_PROPORTION,
    )
    manual_data_root: str | None = setting(
        None,
        "manual: the folder of validation images (captions, folder files and buckets as "
        "data_root). Also spelled val_data_root.",
        text="path",
    )
    extra_manual_datasets: Any = setting(
        None,
        'More validation folders, {"name": "folder"}; each is logged as `loss/<name>`.',
    )
    stabilize_training_loss: bool = setting(
        False,
        "Also evaluate a fixed share of the training images the same way, logged as "
        "`loss/train-stabilized`.",
    )
    stabilize_split_proportion: float = setting(
        0.15,
        "The share of the training images evaluated for `loss/train-stabilized` (at least one).",
        **_PROPORTION,
    )
    every_n_epochs: float = setting(
        1,
        "How often to validate: a whole number of epochs, or a fraction below 1 for several "
        "times per epoch (0.5 = twice, 0.33 = three times).",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=lim.MAX_EPOCHS,
    )
    seed: int = setting(
        555,
        "Seed of the held-out and stabilizing splits and of every validation pass's noise.",
        minimum=0,
        maximum=lim.MAX_SEED,
    )
    use_relative_loss: bool = setting(
        False, "Log each validation loss minus its first (pre-training) value."
    )
    batch_size: int | None = setting(
        None,
        "Images per validation batch; null uses train.json's batch_size.",
        minimum=1,
        maximum=lim.MAX_BATCH_SIZE,
    )


@dataclass(frozen=True)
class ValidationSettings:
    """A checked validation settings file, its folders found.

    ``manual_data_root`` is set only when it is used (``validate_training`` and
    ``val_split_mode: manual``); ``extra`` maps each extra dataset's name to its folder.
    """

    path: Path
    validate_training: bool = True
    val_split_mode: str = "automatic"
    auto_split_proportion: float = 0.15
    manual_data_root: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)
    stabilize_training_loss: bool = False
    stabilize_split_proportion: float = 0.15
    every_n_epochs: float = 1.0
    seed: int = 555
    use_relative_loss: bool = False
    batch_size: int | None = None

    @property
    def holds_out(self) -> bool:
        """Whether images of data_root are held out of training (the automatic split)."""
        return self.validate_training and self.val_split_mode == "automatic"

    @property
    def evaluates_anything(self) -> bool:
        return (
            self.holds_out
            or self.manual_data_root is not None
            or bool(self.extra)
            or self.stabilize_training_loss
        )


def load_validation_config(path: Path) -> ValidationSettings:
    """Read and check a validation settings file; one ConfigError lists every problem."""
    where = f"{WHAT} {path}"
    data = _lenient_booleans(read_json_object(path, WHAT), where)
    problems = [
        f"{where}: give either '{old}' or '{new}', not both"
        for old, new in ALIASES.items()
        if data.get(old) is not None and data.get(new) is not None
    ]
    for old, new in ALIASES.items():
        if data.get(old) is not None:
            logger.warning("%s: '%s' is EveryDream2's old name of '%s'", where, old, new)
    values, parse_problems = parse_fields(ValidationFile, data, where, aliases=ALIASES)
    problems += parse_problems
    merged = defaults_of(ValidationFile) | values
    problems += _every_n_epochs_problems(merged["every_n_epochs"], where)
    extra, extra_problems = _extra_datasets(merged["extra_manual_datasets"], path.parent, where)
    problems += extra_problems
    manual_root = None
    manual = merged["validate_training"] and merged["val_split_mode"] == "manual"
    if manual and merged["manual_data_root"] is not None:
        manual_root = _folder(merged["manual_data_root"], path.parent, where, "manual_data_root")
        if isinstance(manual_root, str):
            problems.append(manual_root)
    elif manual and not extra and not extra_problems:
        problems.append(
            f"{where}: manual_data_root: val_split_mode is manual but no manual_data_root "
            "(or extra_manual_datasets) is given"
        )
    if problems:
        raise ConfigError(problems)
    assert manual_root is None or isinstance(manual_root, Path)
    names = (
        "validate_training",
        "val_split_mode",
        "auto_split_proportion",
        "stabilize_training_loss",
        "stabilize_split_proportion",
        "seed",
        "use_relative_loss",
        "batch_size",
    )
    return ValidationSettings(
        path=path,
        manual_data_root=manual_root,
        extra=extra,
        every_n_epochs=float(merged["every_n_epochs"]),
        **{name: merged[name] for name in names},
    )


def _lenient_booleans(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The strings "true" and "false" of boolean keys read as booleans, with a warning."""
    booleans = [name for name, tp in field_types(ValidationFile).items() if tp is bool]
    out = dict(data)
    for name in booleans:
        value = data.get(name)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            out[name] = value.strip().lower() == "true"
            logger.warning(
                "%s: %s: the string %s is read as %s (write it without quotes)",
                where,
                name,
                describe(value),
                str(out[name]).lower(),
            )
    return out


def _every_n_epochs_problems(value: float, where: str) -> list[str]:
    if value >= 1 and not float(value).is_integer():
        return [
            f"{where}: every_n_epochs: expected a whole number of epochs (1, 2, ...) or a "
            f"fraction below 1 (0.5 = twice per epoch), got {describe(value)}"
        ]
    return []


def _extra_datasets(value: Any, folder: Path, where: str) -> tuple[dict[str, Path], list[str]]:
    """``extra_manual_datasets``: names (tags) and folders, each checked."""
    key = "extra_manual_datasets"
    if value is None:
        return {}, []
    if not isinstance(value, dict):
        return {}, [
            f'{where}: {key}: expected an object {{"name": "folder", ...}}, got {describe(value)}'
        ]
    found: dict[str, Path] = {}
    problems: list[str] = []
    for name, raw in value.items():
        shown = name if name.isprintable() else ascii(name)[1:-1]
        try:
            check_text(name, "line")
            if not name.strip():
                raise InvalidValueError("a dataset name may not be empty")
        except InvalidValueError as error:
            problems.append(f"{where}: {key}.{shown}: {error}")
            continue
        if name in RESERVED_NAMES:
            problems.append(
                f"{where}: {key}.{shown}: the name is taken by loss/{name}; choose another "
                f"(reserved: {', '.join(RESERVED_NAMES)})"
            )
            continue
        resolved = _folder(raw, folder, where, f"{key}.{shown}")
        if isinstance(resolved, str):
            problems.append(resolved)
        else:
            found[name] = resolved
    return found, problems


def _folder(raw: Any, file_folder: Path, where: str, key: str) -> Path | str:
    """The folder ``raw`` names (working directory first, then the file's folder), or the
    problem with it."""
    try:
        text = check_value(raw, str, _PATH_RULE)
    except InvalidValueError as error:
        return f"{where}: {key}: {error}"
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, file_folder / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
        if candidate.exists():
            return f"{where}: {key}: {candidate} is not a folder"
    if len(candidates) == 1:
        return f"{where}: {key}: folder {candidates[0]} does not exist"
    tried = " nor ".join(str(c) for c in candidates)
    return f"{where}: {key}: folder {text} not found: neither {tried} exists"


_PATH_RULE = rule_of(
    next(f for f in dataclasses.fields(ValidationFile) if f.name == "manual_data_root")
)
