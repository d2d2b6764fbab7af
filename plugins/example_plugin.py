"""An example plugin: logs what each hook receives, once per epoch and every 100 steps.

Enable it with ``"plugins": ["plugins.example_plugin.ExampleLoggingPlugin"]`` in train.json
(EveryDream2's example plugin has the same name).
"""

from __future__ import annotations

import logging
from typing import Any

from plugins.plugins import BasePlugin

logger = logging.getLogger(__name__)


class ExampleLoggingPlugin(BasePlugin):
    """Logs the keyword arguments of the epoch hooks and of every 100th step."""

    def __init__(self) -> None:
        self.steps = 0

    def on_training_start(self, **kwargs: Any) -> None:
        logger.info("ExampleLoggingPlugin: training starts in %s", kwargs.get("log_folder"))

    def on_epoch_start(self, **kwargs: Any) -> None:
        self._log("on_epoch_start", kwargs)

    def on_epoch_end(self, **kwargs: Any) -> None:
        self._log("on_epoch_end", kwargs)

    def on_step_end(self, **kwargs: Any) -> None:
        self.steps += 1
        if self.steps % 100 == 0:
            self._log("on_step_end", {k: v for k, v in kwargs.items() if k != "batch"})

    def on_training_end(self, **kwargs: Any) -> None:
        logger.info("ExampleLoggingPlugin: training ended after %d batches", self.steps)

    @staticmethod
    def _log(hook: str, kwargs: dict[str, Any]) -> None:
        described = ", ".join(f"{key}={value!r:.60}" for key, value in kwargs.items())
        logger.info("ExampleLoggingPlugin.%s: %s", hook, described)
