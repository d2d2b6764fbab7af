"""The run's log file: everything logged during training, and tracebacks that the screen omits.

The main process writes ``train.log`` in the run folder. Records logged with
``extra=FILE_ONLY`` (the traceback of a crash) go to the file only, so the screen shows one
clear line while the file keeps the details.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE_ONLY = {"file_only": True}
LOG_FILE = "train.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


@contextmanager
def log_file(folder: Path | None) -> Iterator[Path | None]:
    """Log to ``folder/train.log`` inside the block (nothing when ``folder`` is None)."""
    if folder is None:
        yield None
        return
    root = logging.getLogger()
    path = folder / LOG_FILE
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter(FORMAT))
    others = list(root.handlers)
    screen_filter = _NotFileOnly()
    for other in others:
        other.addFilter(screen_filter)
    root.addHandler(handler)
    level = root.level
    root.setLevel(min(level, logging.INFO))  # the file keeps INFO records whatever the screen
    try:
        yield path
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
        handler.close()
        for other in others:
            other.removeFilter(screen_filter)
