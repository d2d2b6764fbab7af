"""Loading the plugins that train.json's ``plugins`` names, before any model loads.

Each entry is ``module.Class``: the module is imported with the working directory and the
folder of train.json searched first (a ``plugins/`` folder in either extends this package, so
EveryDream2's ``plugins.my_plugin.MyPlugin`` entries work), and the class, a subclass of
`plugins.plugins.BasePlugin`, is constructed without arguments. Any problem is a `UserError`
naming the entry.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import plugins
from config.errors import UserError
from plugins.plugins import BasePlugin

logger = logging.getLogger(__name__)

KEY = "plugins"


def search_folders(config_folder: Path | None) -> list[Path]:
    """The working directory and train.json's folder, in that order, without repeats."""
    folders = [Path.cwd()] + ([config_folder] if config_folder is not None else [])
    unique: list[Path] = []
    for folder in folders:
        resolved = folder.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def _extend_search_path(folders: list[Path]) -> None:
    """Put the folders on sys.path and their ``plugins/`` subfolders into this package's path."""
    own = [os.path.realpath(p) for p in plugins.__path__]
    for folder in reversed(folders):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        extra = folder / "plugins"
        if extra.is_dir() and os.path.realpath(extra) not in own:
            plugins.__path__.insert(0, str(extra))
            own.insert(0, os.path.realpath(extra))


def load_plugin(entry: str) -> BasePlugin:
    """Import ``module.Class`` and construct it; `UserError` naming the entry if it fails."""
    module_name, _, class_name = entry.rpartition(".")
    if not module_name or not class_name:
        raise UserError(f"{KEY}: '{entry}': expected 'module.Class', e.g. 'my_plugin.MyPlugin'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UserError(
            f"{KEY}: '{entry}': no module named '{error.name}' (looked in the working directory, "
            f"the folder of train.json and their plugins/ folders)"
        ) from None
    except Exception as error:
        raise UserError(
            f"{KEY}: '{entry}': importing {module_name} failed: {type(error).__name__}: {error}"
        ) from error
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"{KEY}: '{entry}': module {module_name} has no class '{class_name}'")
    if not issubclass(cls, BasePlugin):
        raise UserError(
            f"{KEY}: '{entry}': {class_name} is not a plugin: it must subclass BasePlugin "
            f"(from plugins.plugins import BasePlugin)"
        )
    try:
        return cls()
    except Exception as error:
        raise UserError(
            f"{KEY}: '{entry}': constructing {class_name}() failed: {type(error).__name__}: {error}"
        ) from error


def load_plugins(entries: list[str] | None, config_folder: Path | None) -> list[BasePlugin]:
    """Every plugin that ``entries`` names, constructed, in order."""
    if not entries:
        return []
    _extend_search_path(search_folders(config_folder))
    loaded = [load_plugin(entry) for entry in entries]
    logger.info("plugins: %s", ", ".join(type(p).__name__ for p in loaded))
    return loaded
