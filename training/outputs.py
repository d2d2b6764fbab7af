"""What a run writes besides checkpoints: its folder, resolved config, progress and TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from config.errors import UserError
from training.checkpointing.names import RUN_FOLDER_NUMBER_DIGITS, RUN_STAMP, run_folder_name

logger = logging.getLogger(__name__)


def create_run_folder(logdir: str, project_name: str, run_name: str | None) -> Path:
    """``logdir/<project_name>_<timestamp>[_<run_name>]``, created now."""
    name = run_folder_name(project_name, run_name, datetime.now().strftime(RUN_STAMP))
    folder = Path(logdir) / name
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        number = time.time_ns() % 10**RUN_FOLDER_NUMBER_DIGITS
        folder = folder.with_name(f"{name}-{number}")
        folder.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"logdir: cannot create {folder}: {error.strerror}") from None
    return folder


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file (the resolved configuration, with sources); a full disk or an
    unwritable folder is a `UserError` naming the file and the reason."""
    try:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
