"""`Metrics`: where a run's scalars and images go: TensorBoard, and Weights & Biases when asked.

Created by the main process only. Tags are plain strings (``loss/train``,
``hyperparameter/lr unet``, ``samples/0``); every sink receives the same values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

# How often TensorBoard's writer thread puts new events on disk (torch's default is 120 s). The
# training loop never waits for the disk: short epochs would otherwise pay a flush each.
TENSORBOARD_FLUSH_SECONDS = 10


class Sink(Protocol):
    """One destination of metrics."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in the run folder (``tensorboard --logdir logs``), written to disk by the
    writer's own thread every `TENSORBOARD_FLUSH_SECONDS` and when the run closes."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=TENSORBOARD_FLUSH_SECONDS)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding every value: what ``add_scalar`` writes for each, without an event
        (and a trip through the writer's queue) per tag."""
        from torch.utils.tensorboard.summary import scalar

        items = iter(values.items())
        summary = scalar(*next(items))
        for tag, value in items:
            summary.value.extend(scalar(tag, value).value)
        self.writer.file_writer.add_summary(summary, step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (``wandb: true``): project = project_name, name = run_name.

    ``WANDB_MODE=offline`` works without a network (``wandb sync`` uploads the run later);
    online mode needs ``wandb login`` or ``WANDB_API_KEY``.
    """

    def __init__(self, folder: Path, project: str, name: str | None, config: dict[str, Any]):
        import wandb

        from config.errors import UserError

        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=project,
                name=name,
                dir=str(folder),
                config=config,
                settings=wandb.Settings(init_timeout=60, console="off"),
            )
        except Exception as error:
            raise UserError(
                f"wandb: cannot start a Weights & Biases run ({type(error).__name__}: {error}); "
                "log in with `wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline"
            ) from error

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self.run.log({tag: self.wandb.Image(image, caption=caption or None)}, step=step)

    def flush(self) -> None:
        """W&B writes as it goes."""

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """Fans scalars and images out to every sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Every value at ``step``, in one write per sink (none when ``values`` is empty)."""
        if not values:
            return
        as_floats = {tag: float(value) for tag, value in values.items()}
        for sink in self.sinks:
            sink.scalars(as_floats, step)

    def image(self, tag: str, image: Any, step: int, caption: str = "") -> None:
        """An image (PIL or an H×W×3 uint8 array)."""
        array = np.asarray(image)
        for sink in self.sinks:
            sink.image(tag, array, step, caption)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
