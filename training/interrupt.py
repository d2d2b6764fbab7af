"""Ctrl-C and SIGTERM: finish the current optimizer step, save, exit 0."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop checks it after each optimizer step."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # a second Ctrl-C means: stop now, whatever it costs
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s received: finishing the current step and saving a resumable checkpoint "
            "(press Ctrl-C again to abort without saving)",
            signal.Signals(signum).name,
        )


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for the duration of training, then restore the previous ones."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
