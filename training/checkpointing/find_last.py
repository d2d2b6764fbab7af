"""``resume_ckpt: "findlast"``: continue from the newest checkpoint of this project (EveryDream2).

Checkpoint folders are named ``[last-|interrupted-|diverged-|crashed-]<project_name>-epNN-gsNNNNN``
and hold ``model_index.json`` (a LoRA run's: ``pytorch_lora_weights.safetensors``). They are
looked for in every run folder under ``logdir`` (run folders are
``<project_name>_<timestamp>[_<run_name>]``, but any folder there is searched) and directly in
``save_ckpt_dir`` when it is set. The newest is the one whose marker file was written last (its
modification time, as EveryDream2 decides); equal times go to the higher global step. A newest
checkpoint that is ``diverged-`` is refused (it holds the weights from before the run diverged;
name it explicitly to continue from it anyway), like EveryDream2 refuses an errored one.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from config.errors import UserError
from config.load import LoadedTrainConfig

logger = logging.getLogger(__name__)

FINDLAST = "findlast"
PIPELINE_MARKER = "model_index.json"
MARKERS = (PIPELINE_MARKER, "pytorch_lora_weights.safetensors")  # full and LoRA checkpoints
_KINDS = ("last", "interrupted", "diverged", "crashed")


def _pattern(project_name: str, suffix: str = "") -> re.Pattern[str]:
    kinds = "|".join(_KINDS)
    name = rf"(?:(?:{kinds})-)?{re.escape(project_name)}-ep(\d+)-gs(\d+)"
    return re.compile(name + re.escape(suffix))


def _candidates(folder: Path, pattern: re.Pattern[str]) -> list[tuple[float, int, Path]]:
    """(mtime, global step, path) of the checkpoints directly in ``folder``."""
    found = []
    if not folder.is_dir():
        return found
    for child in folder.iterdir():
        match = pattern.fullmatch(child.name)
        if match is None or not child.is_dir():
            continue
        for marker in (child / name for name in MARKERS):
            if marker.is_file():
                found.append((marker.stat().st_mtime, int(match.group(2)), child))
                break
    return found


def find_last_checkpoint(
    project_name: str,
    logdir: Path,
    save_ckpt_dir: Path | None,
    suffix: str = "",
    key: str = "resume_ckpt",
) -> Path:
    """The newest checkpoint of ``project_name`` (see the module docstring); `UserError` if none.

    ``suffix`` ("_ema") looks for the folders written beside the checkpoints instead; ``key``
    names the setting in messages.
    """
    pattern = _pattern(project_name, suffix)
    found = []
    if logdir.is_dir():
        for run_folder in sorted(logdir.iterdir()):
            found += _candidates(run_folder, pattern)
    if save_ckpt_dir is not None:
        found += _candidates(save_ckpt_dir, pattern)
    where = f"{logdir}/*/" + ("" if save_ckpt_dir is None else f" or {save_ckpt_dir}/")
    if not found:
        raise UserError(
            f"{key}: findlast found no checkpoint of project '{project_name}' (folders "
            f"named [last-]{project_name}-epNN-gsNNNNN{suffix} with {' or '.join(MARKERS)}) in "
            f"{where}; "
            f"check project_name, logdir and save_ckpt_dir, or name a model to start from"
        )
    _mtime, _step, newest = max(found, key=lambda item: (item[0], item[1]))
    if newest.name.startswith("diverged-"):
        raise UserError(
            f"{key}: findlast: the newest checkpoint of '{project_name}' is {newest}, saved "
            f"when training diverged; set {key} to it explicitly to continue from it"
        )
    return newest


def resolve_findlast(train: LoadedTrainConfig) -> LoadedTrainConfig:
    """``train`` with ``resume_ckpt: findlast`` replaced by the checkpoint found (logged)."""
    c = train.config
    if c.resume_ckpt != FINDLAST:
        return train
    save_ckpt_dir = None if c.save_ckpt_dir is None else Path(c.save_ckpt_dir).expanduser()
    found = find_last_checkpoint(c.project_name, Path(c.logdir).expanduser(), save_ckpt_dir)
    logger.info("resume_ckpt findlast: resuming from %s", found)
    config = dataclasses.replace(c, resume_ckpt=str(found))
    return dataclasses.replace(train, config=config)
