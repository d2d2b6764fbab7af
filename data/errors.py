"""Errors of the data layer that end a run with one clear message (exit status 2)."""

from __future__ import annotations

from pathlib import Path

from config.errors import UserError


def printable(path: Path | str) -> str:
    """A path as text that can always be logged and written as UTF-8 JSON.

    `os.walk` gives a file name that is not valid UTF-8 with "surrogate escapes"; such a string
    cannot be encoded, so it would crash a UTF-8 log file, the dry run's JSON or the tokenizer.
    The undecodable bytes are shown as `\\xNN` instead.
    """
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_valid_text(text: str) -> bool:
    """True when `text` can be encoded as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class DataRootChangedError(UserError):
    """The images found at start-up cannot be read any more (deleted, moved, unmounted or
    rewritten during training). The message is one line naming data_root and what happened.

    Raised by the loader (also from worker processes: it reaches the training process as this
    class with its one-line message) and by `TrainDataset.decode`.
    """


class DataTransformError(UserError):
    """A data transform (EveryDream2 plugin hook) returned something that cannot be trained on."""
