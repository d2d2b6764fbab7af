"""`BasePlugin`: EveryDream2's plugin base class, with the same hooks and the same import path.

Subclass it and override what you need; every hook does nothing by default. The trainer calls
the training hooks in the main process with EveryDream2's keyword arguments (accept
``**kwargs``, as EveryDream2's own plugins do, so new arguments never break a plugin):

- ``on_training_start(log_folder, project_name)`` and ``on_training_end()``;
- ``on_epoch_start(epoch, global_step, epoch_length, project_name, log_folder, data_root,
  arg_update_callback)`` and ``on_epoch_end(epoch, global_step, project_name, log_folder,
  data_root, arg_update_callback)``;
- ``on_step_start(epoch, local_step, global_step, project_name, log_folder, batch, ed_state)``
  and ``on_step_end(epoch, global_step, local_step, project_name, log_folder, data_root, batch,
  ed_state)``, around each batch.

``transform_caption(caption) -> str`` and ``transform_pil_image(img) -> img`` change each
image's caption and picture every time it is used, wherever the data is loaded (data-loader
worker processes included).
"""

from __future__ import annotations

from typing import Any

from PIL import Image


class BasePlugin:
    """A plugin; the trainer constructs it without arguments."""

    def on_epoch_start(self, **kwargs: Any) -> None:
        pass

    def on_epoch_end(self, **kwargs: Any) -> None:
        pass

    def on_training_start(self, **kwargs: Any) -> None:
        pass

    def on_training_end(self, **kwargs: Any) -> None:
        pass

    def on_step_start(self, **kwargs: Any) -> None:
        pass

    def on_step_end(self, **kwargs: Any) -> None:
        pass

    def transform_caption(self, caption: str) -> str:
        return caption

    def transform_pil_image(self, img: Image.Image) -> Image.Image:
        return img
