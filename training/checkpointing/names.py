"""Names of what a run writes: checkpoint folders and files, and the longest one it can need.

Checkpoints are named ``<project_name>-ep<epoch:02d>-gs<global step:05d>`` (EveryDream2's
pattern), with a prefix that says why they were written: ``last-`` (the end of training,
unless ``no_prepend_last``), ``interrupted-``, ``diverged-``, ``crashed-``; periodic ones have
none. When another run's checkpoint already has the name, ``-2``, ``-3``, ... is appended.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from config.errors import UserError
from storage.atomic import folder_lock, prepare_parent

KINDS = ("periodic", "last", "interrupted", "diverged", "crashed")
CLAIM_FILE = ".claimed-by-run"  # in a checkpoint folder a run has claimed and not yet written
NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows)
PATH_MAX = 4095  # bytes in a path (Linux)
# What can be added to a checkpoint's name: a "-NN" to make it unique, "_ema" for the EMA
# pipeline, ".safetensors" for the single file, and the temporary ".<name>.partial-<pid>-<hex>"
# (process ids up to 7 digits, 8 hex digits) while it is written.
# Run folders: a timestamp (`RUN_STAMP`), and a number when two runs start in the same second.
RUN_STAMP = "%Y%m%d-%H%M%S"
RUN_STAMP_EXAMPLE = "20261203-074859"
RUN_FOLDER_NUMBER_DIGITS = 6
SUFFIX_RESERVE = len("-99") + len("_ema") + len(".safetensors")
TEMPORARY_RESERVE = len(".") + len(".partial-") + 7 + len("-") + 8


def checkpoint_name(
    project_name: str, kind: str, epoch: int, global_step: int, no_prepend_last: bool
) -> str:
    """The folder name of a checkpoint of ``kind`` at (epoch, global step)."""
    assert kind in KINDS, kind
    name = f"{project_name}-ep{epoch:02d}-gs{global_step:05d}"
    if kind == "periodic" or (kind == "last" and no_prepend_last):
        return name
    return f"{kind}-{name}"


def free_path(folder: Path, name: str, is_ours: Callable[[Path], bool]) -> Path:
    """``folder/name`` when nothing is there or it is this run's own (then it is replaced);
    otherwise the first ``folder/name-N`` (N = 2, 3, ...) that is."""
    path = folder / name
    number = 2
    while path.exists() and not is_ours(path):
        path = folder / f"{name}-{number}"
        number += 1
    return path


def claim_path(folder: Path, name: str, run_id: str, is_ours: Callable[[Path], bool]) -> Path:
    """`free_path`, claimed for run ``run_id`` before any other run can take it.

    Under the folder's lock, a free name gets its folder at once with a `CLAIM_FILE` naming the
    run (the checkpoint later replaces it), so two runs that save at the same moment never write
    to the same name. `claimed_by` reads the claim.
    """
    prepare_parent(folder / name, "checkpoint")
    with folder_lock(folder):
        path = free_path(folder, name, is_ours)
        if not path.exists():
            path.mkdir()
            (path / CLAIM_FILE).write_text(run_id, encoding="utf-8")
    return path


def claimed_by(path: Path) -> str | None:
    """The run that claimed the not yet written checkpoint folder ``path``; None: no claim."""
    try:
        return (path / CLAIM_FILE).read_text(encoding="utf-8")
    except OSError:
        return None


def run_folder_name(project_name: str, run_name: str | None, stamp: str) -> str:
    """``<project_name>_<timestamp>[_<run_name>]``: the run folder inside ``logdir``."""
    return f"{project_name}_{stamp}" + ("" if run_name is None else f"_{run_name}")


def checkpoint_dir(save_ckpt_dir: str | None, run_folder: Path) -> Path:
    """Where a run's checkpoints go: ``save_ckpt_dir`` when set, else the run folder."""
    return run_folder if save_ckpt_dir is None else Path(save_ckpt_dir)


def longest_checkpoint_dir(
    save_ckpt_dir: str | None, logdir: str, project_name: str, run_name: str | None
) -> Path:
    """`checkpoint_dir` before the run folder exists: its longest possible path."""
    stamp = "0" * len(RUN_STAMP_EXAMPLE) + "-" + "9" * RUN_FOLDER_NUMBER_DIGITS
    return checkpoint_dir(
        save_ckpt_dir, Path(logdir) / run_folder_name(project_name, run_name, stamp)
    )


def check_output_names(
    project_name: str, checkpoint_dir: Path, max_epochs: int, total_steps: int
) -> None:
    """`UserError` when a checkpoint this run may write would have a name or path too long.

    Checked before training starts, with the largest epoch and step numbers of the run, so a
    run never trains to the end and then fails to save. ``checkpoint_dir`` is the longest the
    run can have (`longest_checkpoint_dir`); ``total_steps`` an upper bound of its optimizer
    steps.
    """
    longest = checkpoint_name(project_name, "interrupted", max_epochs, total_steps, False)
    name_bytes = len(longest.encode("utf-8", "surrogateescape")) + SUFFIX_RESERVE
    if name_bytes + TEMPORARY_RESERVE > NAME_MAX:
        allowed = NAME_MAX - TEMPORARY_RESERVE - SUFFIX_RESERVE - (len(longest) - len(project_name))
        raise UserError(
            f"project_name: too long: checkpoint names such as '{longest}' would pass the "
            f"{NAME_MAX}-byte limit of a file name; use at most {allowed} bytes"
        )
    full = os.path.abspath(checkpoint_dir / longest)
    if len(full.encode("utf-8", "surrogateescape")) + SUFFIX_RESERVE + TEMPORARY_RESERVE > PATH_MAX:
        raise UserError(
            f"save_ckpt_dir / logdir: checkpoint paths such as {full} would pass the "
            f"{PATH_MAX}-byte limit of a path; choose a shorter folder"
        )
