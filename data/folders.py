"""Folder-level settings: local.yaml, global.yaml, multiply.txt, flip_p.txt, cond_dropout.txt.

- `global.yaml` applies to its folder and every folder below it;
- `local.yaml` and the one-number `.txt` files apply to their own folder only;
- for numbers the nearest setting wins (this folder's local files, then the nearest global.yaml);
  tags add up (the image's own first, then local, then each global.yaml from nearest to farthest).

A folder file that cannot be used stops the run with a `UserError` naming the file: it affects
many images, so training without it would not be what the user asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from config.errors import UserError
from data.sidecars import NUMBER_KEYS, SidecarError, SidecarValues, read_number_file, read_yaml_file

logger = logging.getLogger(__name__)

LOCAL_YAML_NAMES = ("local.yaml", "local.yml")
GLOBAL_YAML_NAMES = ("global.yaml", "global.yml")
NUMBER_FILE_NAMES = {f"{key}.txt": key for key in NUMBER_KEYS}
FOLDER_FILE_NAMES = frozenset(LOCAL_YAML_NAMES + GLOBAL_YAML_NAMES + tuple(NUMBER_FILE_NAMES))


@dataclass(frozen=True)
class FolderConfig:
    """Settings in force for the images of one folder. `None` means "not set by any folder"."""

    main_prompt: str | None = None
    tags: tuple[tuple[str, float], ...] = ()
    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None

    def under(self, nearer: SidecarValues | FolderConfig) -> FolderConfig:
        """These settings with `nearer` (a more specific file) taking precedence."""
        numbers = {
            key: getattr(nearer, key) if getattr(nearer, key) is not None else getattr(self, key)
            for key in NUMBER_KEYS
        }
        main = nearer.main_prompt if nearer.main_prompt is not None else self.main_prompt
        return FolderConfig(main_prompt=main, tags=nearer.tags + self.tags, **numbers)


def _one_of(directory: Path, names: set[str], candidates: tuple[str, ...]) -> Path | None:
    present = [name for name in candidates if name in names]
    if len(present) > 1:
        raise UserError(f"{directory}: holds both {present[0]} and {present[1]}; keep one of them")
    return directory / present[0] if present else None


def _read_yaml(path: Path) -> SidecarValues:
    try:
        values = read_yaml_file(path)
    except SidecarError as error:
        raise UserError(str(error)) from None
    if values.ignored_keys:
        logger.warning(
            "%s: %s not used by this trainer (ignored)", path, ", ".join(values.ignored_keys)
        )
    return values


def _read_local(directory: Path, names: set[str]) -> SidecarValues:
    """local.yaml plus the one-number files of this folder; the same key in two of them is an
    error (which one should win would be a guess)."""
    local_path = _one_of(directory, names, LOCAL_YAML_NAMES)
    values = _read_yaml(local_path) if local_path is not None else SidecarValues()
    for file_name, key in NUMBER_FILE_NAMES.items():
        if file_name not in names:
            continue
        path = directory / file_name
        if getattr(values, key) is not None:
            raise UserError(
                f"{path}: {key} is also set in {local_path}; keep it in one of the two files"
            )
        try:
            values = replace(values, **{key: read_number_file(path, key)})
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
    for_subfolders = inherited if global_path is None else inherited.under(_read_yaml(global_path))
    for_images = for_subfolders.under(_read_local(directory, names))
    return for_images, for_subfolders
