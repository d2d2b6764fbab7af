"""Calling plugins: EveryDream2's time limits per hook, errors that name the plugin, and the
data transforms (``transform_caption``, ``transform_pil_image``) as one object the data
loader applies."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from plugins.plugins import BasePlugin

logger = logging.getLogger(__name__)

# EveryDream2's limits: a hook slower than this gets a warning naming it.
STEP_SECONDS = 0.5
EPOCH_SECONDS = 5.0
TRAINING_SECONDS = 20.0
LIMITS = {
    "on_step_start": STEP_SECONDS,
    "on_step_end": STEP_SECONDS,
    "transform_caption": STEP_SECONDS,
    "transform_pil_image": STEP_SECONDS,
    "on_epoch_start": EPOCH_SECONDS,
    "on_epoch_end": EPOCH_SECONDS,
    "on_training_start": TRAINING_SECONDS,
    "on_training_end": TRAINING_SECONDS,
}


class PluginError(RuntimeError):
    """A plugin raised: the run stops like any crash, and the message names the plugin."""


def call(plugin: BasePlugin, hook: str, *args: Any, **kwargs: Any) -> Any:
    """``plugin.hook(*args, **kwargs)``, timed against EveryDream2's limit for that hook."""
    name = f"{type(plugin).__name__}.{hook}"
    started = time.perf_counter()
    try:
        result = getattr(plugin, hook)(*args, **kwargs)
    except Exception as error:
        raise PluginError(f"plugin {name} raised {type(error).__name__}: {error}") from error
    elapsed = time.perf_counter() - started
    if elapsed > LIMITS[hook]:
        logger.warning(
            "plugin %s took %.2f s, longer than the %g s EveryDream2 allows %s hooks",
            name,
            elapsed,
            LIMITS[hook],
            hook.removeprefix("on_").split("_")[0],
        )
    return result


class PluginTransforms:
    """Every plugin's caption and image transforms, in the order the plugins are listed.

    Picklable (data-loader worker processes get a copy of the plugins).
    """

    def __init__(self, plugins: Sequence[BasePlugin]) -> None:
        self.plugins = list(plugins)

    def caption(self, caption: str) -> str:
        for plugin in self.plugins:
            caption = call(plugin, "transform_caption", caption)
            if not isinstance(caption, str):
                raise PluginError(
                    f"plugin {type(plugin).__name__}.transform_caption returned "
                    f"{type(caption).__name__}, not a caption (str)"
                )
        return caption

    def image(self, image: Image.Image) -> Image.Image:
        for plugin in self.plugins:
            image = call(plugin, "transform_pil_image", image)
            if not isinstance(image, Image.Image):
                raise PluginError(
                    f"plugin {type(plugin).__name__}.transform_pil_image returned "
                    f"{type(image).__name__}, not a PIL image"
                )
        return image
