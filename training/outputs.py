"""What a run writes besides checkpoints: its folder, resolved config, progress and TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from config.errors import UserError

logger = logging.getLogger(__name__)


def create_run_folder(logdir: str, project_name: str, run_name: str | None) -> Path:
    """``logdir/<project_name>_<timestamp>[_<run_name>]``, created now."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{project_name}_{stamp}" + ("" if run_name is None else f"_{run_name}")
    folder = Path(logdir) / name
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        folder = folder.with_name(f"{name}-{time.time_ns() % 1_000_000}")
        folder.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"logdir: cannot create {folder}: {error.strerror}") from None
    return folder


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file (the resolved configuration, with sources)."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@dataclass
class Progress:
    """One tqdm bar over optimizer steps, and TensorBoard scalars every ``log_step`` steps."""

    total_steps: int
    initial_step: int
    log_step: int
    folder: Path | None  # None: not the main process, nothing is shown or written
    _bar: tqdm | None = field(init=False, default=None)
    _writer: SummaryWriter | None = field(init=False, default=None)
    _losses: list[float] = field(init=False, default_factory=list)
    _images: int = field(init=False, default=0)
    _since: float = field(init=False, default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.folder is not None:
            self._writer = SummaryWriter(log_dir=str(self.folder))
            self._bar = tqdm(
                total=self.total_steps, initial=self.initial_step, unit="step", dynamic_ncols=True
            )

    @property
    def writer(self) -> SummaryWriter | None:
        return self._writer

    def micro_batch(self, loss: float, images: int) -> None:
        """Record one micro-batch's loss and size."""
        self._losses.append(loss)
        self._images += images

    def optimizer_step(
        self, step: int, epoch: int, lrs: dict[str, float], scalars: dict[str, float]
    ) -> None:
        """Advance the bar; every log_step steps write the averages since the last write."""
        if self._bar is None or not self._losses:
            return
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        loss = sum(self._losses) / len(self._losses)
        images_per_second = self._images / elapsed
        self._bar.update(1)
        postfix = {"epoch": epoch + 1, "loss": f"{loss:.4f}", "img/s": f"{images_per_second:.1f}"}
        postfix |= {f"lr_{name}": f"{lr:.2e}" for name, lr in lrs.items()}
        self._bar.set_postfix(postfix, refresh=False)
        if step % self.log_step != 0:
            return
        assert self._writer is not None
        self._writer.add_scalar("loss/train", loss, step)
        self._writer.add_scalar("performance/images_per_second", images_per_second, step)
        self._writer.add_scalar("epoch", epoch + 1, step)
        for name, lr in lrs.items():
            self._writer.add_scalar(f"lr/{name}", lr, step)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._losses.clear()
        self._images = 0
        self._since = time.perf_counter()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
