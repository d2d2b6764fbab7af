"""Folder-level settings: local.yaml, global.yaml and the one-value files (multiply.txt,
flip_p.txt, cond_dropout.txt, loss_scale.txt, batch_id.txt, shuffle_tags.txt).

- `global.yaml` applies to its folder and every folder below it;
- `local.yaml` and the one-value `.txt` files apply to their own folder only;
- for settings the nearest file wins (this folder's local files, then the nearest global.yaml);
  main prompts and tags add up, nearest first (EveryDream2's order).

A folder file that cannot be used (a bad value, broken YAML, an unknown key) stops the run with
a `UserError` naming the file: it affects many images, so training without it would not be what
the user asked for.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from config.errors import UserError
from data.sidecars import SidecarError, SidecarValues, read_value_file, read_yaml_file

logger = logging.getLogger(__name__)

LOCAL_YAML_NAMES = ("local.yaml", "local.yml")
GLOBAL_YAML_NAMES = ("global.yaml", "global.yml")
VALUE_FILE_KEYS = ("multiply", "flip_p", "cond_dropout", "loss_scale", "batch_id", "shuffle_tags")
VALUE_FILE_NAMES = {f"{key}.txt": key for key in VALUE_FILE_KEYS}
FOLDER_FILE_NAMES = frozenset(LOCAL_YAML_NAMES + GLOBAL_YAML_NAMES + tuple(VALUE_FILE_NAMES))

FolderConfig = SidecarValues  # what the folder files in force for one folder say


def _one_of(directory: Path, names: set[str], candidates: tuple[str, ...]) -> Path | None:
    present = [name for name in candidates if name in names]
    if len(present) > 1:
        raise UserError(f"{directory}: holds both {present[0]} and {present[1]}; keep one of them")
    return directory / present[0] if present else None


def _read_yaml(path: Path) -> SidecarValues:
    try:
        return read_yaml_file(path, strict=True)
    except SidecarError as error:
        raise UserError(str(error)) from None


def _read_local(directory: Path, names: set[str]) -> SidecarValues:
    """local.yaml plus the one-value files of this folder; the same key in two of them is an
    error (which one should win would be a guess)."""
    local_path = _one_of(directory, names, LOCAL_YAML_NAMES)
    values = _read_yaml(local_path) if local_path is not None else SidecarValues()
    for file_name, key in VALUE_FILE_NAMES.items():
        if file_name not in names:
            continue
        path = directory / file_name
        if getattr(values, key) is not None:
            raise UserError(
                f"{path}: {key} is also set in {local_path}; keep it in one of the two files"
            )
        try:
            values = replace(values, **{key: read_value_file(path, key)})
        except SidecarError as error:
            raise UserError(str(error)) from None
    return values


def read_folder(
    directory: Path, names: set[str], inherited: FolderConfig
) -> tuple[FolderConfig, FolderConfig]:
    """Settings for the images of `directory` and the ones its subfolders inherit.

    `names` are the file names in the folder; `inherited` what the parent folders' global.yaml
    files set.
    """
    global_path = _one_of(directory, names, GLOBAL_YAML_NAMES)
    for_subfolders = inherited if global_path is None else _read_yaml(global_path).over(inherited)
    for_images = _read_local(directory, names).over(for_subfolders)
    return for_images, for_subfolders
