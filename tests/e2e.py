"""Helpers for end-to-end tests: run train.py for real on the built-in tiny models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import train
from models.text_keys import TEXT_MODEL

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "examples" / "data"

# A small, fast run on the bundled images: 12 images → 7 batches of 2 per epoch.
FAST = {
    "resume_ckpt": "tiny-sd15",
    "data_root": str(EXAMPLE_DATA),
    "resolution": 64,
    "batch_size": 2,
    "max_epochs": 2,
    "lr": 1e-4,
    "seed": 555,
    "log_step": 1,
    "cond_dropout": 0.1,
    "flip_p": 0.5,
    "dataloader_num_workers": 0,
}
# A full checkpoint's marker file, and a LoRA checkpoint's.
CHECKPOINT_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors")
ADAMW = {"base": {"optimizer": "adamw", "lr": 1e-4}}
# The optimizer.json of a test that names none: the built-in defaults with torch's AdamW instead
# of adamw8bit, whose bitsandbytes step on the CPU takes 3 times as long on tiny-sd15 (49 ms
# against 15): an eighth of the suite's CPU time (docs/development.md). The tests of adamw8bit
# name it.
TEST_OPTIMIZER = {"base": {"optimizer": "adamw"}}


def write_config(
    folder: Path, optimizer: dict[str, Any] | None = TEST_OPTIMIZER, **train_keys: Any
) -> Path:
    """A train.json (and optimizer.json) in ``folder`` with logs kept inside it; ``optimizer``
    None writes no optimizer.json (the built-in defaults: adamw8bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {**FAST, "logdir": str(folder / "logs"), **train_keys}
    if optimizer is not None:
        (folder / "optimizer.json").write_text(json.dumps(optimizer))
        data["optimizer_config"] = str(folder / "optimizer.json")
    path = folder / "train.json"
    path.write_text(json.dumps(data))
    return path


# One sample image per sampling point, drawn in two steps: for tests about when and with which
# weights samples are made (EveryDream2's defaults draw each prompt at three guidance scales
# in 30 steps each).
QUICK_PROMPTS = {"seed": 5, "cfgs": [3], "num_inference_steps": 2, "samples": [{"prompt": "a cat"}]}


def quick_prompts(folder: Path) -> str:
    """A sample_prompts.json of `QUICK_PROMPTS` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sample_prompts.json"
    path.write_text(json.dumps(QUICK_PROMPTS))
    return str(path)


def manual_validation(folder: Path, data_root: Path = EXAMPLE_DATA) -> str:
    """A validation.json in ``folder`` that validates on ``data_root`` (the bundled images),
    batch 2."""
    path = folder / "validation.json"
    path.write_text(
        json.dumps(
            {"val_split_mode": "manual", "batch_size": 2, "manual_data_root": str(data_root)}
        )
    )
    return str(path)


def run(config: Path, *flags: str) -> int:
    """train.py in this process."""
    return train.main(["--config", str(config), *flags])


def run_subprocess(config: Path, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """train.py in a fresh Python, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=os.environ.copy(),
    )


def free_port() -> int:
    """A TCP port nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_folders(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "logs").iterdir() if p.is_dir())


def checkpoints(folder: Path, prefix: str = "") -> list[Path]:
    """Checkpoint folders of every run under ``folder``, oldest run first."""
    found = []
    for run_folder in run_folders(folder):
        found += sorted(
            p
            for p in run_folder.iterdir()
            if p.is_dir()
            and p.name.startswith(prefix)
            and any((p / marker).exists() for marker in CHECKPOINT_MARKERS)
        )
    return found


def own(folder: Path, prefix: str) -> Path:
    """The one resumable checkpoint under ``folder`` named ``prefix...`` (not the ``_ema`` one
    beside it)."""
    (found,) = [c for c in checkpoints(folder, prefix) if not c.name.endswith("_ema")]
    return found


def training_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's training state (fp32 weights, adapters, EMA), by
    ``<file stem>.<key>``."""
    return {
        f"{file.stem}.{key}": value
        for file in sorted((checkpoint / "training_state").glob("*.safetensors"))
        for key, value in load_file(file).items()
    }


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of UNet and text encoder as saved (fp32 copies when files are fp16).

    Text-encoder keys are the standard ``text_model.…`` ones whichever file they come from.
    """
    weights = {}
    for name, file in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        exact = checkpoint / "training_state" / f"{name}.safetensors"
        source = exact if exact.exists() else checkpoint / name / file
        for key, value in load_file(source).items():
            if name == "text_encoder" and not key.startswith(TEXT_MODEL):
                key = TEXT_MODEL + key
            weights[f"{name}.{key}"] = value
    return weights


def scalars(run_folder: Path, tag: str) -> list[float]:
    """A TensorBoard scalar series of a run, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_folder))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, fp16: bool = False) -> None:
    """``b`` has ``a``'s weights (the same names); ``fp16``: ``a``'s rounded to fp16."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        expected, actual = (sa[key].half() if fp16 else sa[key]), sb[key]
        if expected.dtype != actual.dtype:  # else compared as they are: no float copies
            expected, actual = expected.float(), actual.float()
        assert torch.equal(expected, actual), key
