"""The train.json schema: every key, its default and its rules, in one place.

Each field is a train.json key and a command-line flag of the same name. The keys are
EveryDream2's (so its train.json files keep working) plus a few of this trainer's own.
Keys EveryDream2 had that do nothing here are ``deprecated`` (a warning when set, never
silently ignored). Every number has a minimum and a
maximum (`config.limits`), every path and name the file system's limits.

This module imports nothing heavy: ``train.py --help`` is built from it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from config import limits as lim
from config.choices import (
    ATTENTION_TYPES,
    EMA_DEVICES,
    GROUPS,
    LOSS_TYPES,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    PREDICTION_TYPES,
    TRAIN_SAMPLERS,
)
from config.fields import setting
from config.train_keys import TrainingKeys

__all__ = [
    "ATTENTION_TYPES",
    "EMA_DEVICES",
    "GROUPS",
    "LOSS_TYPES",
    "LR_SCHEDULERS",
    "MIXED_PRECISIONS",
    "PREDICTION_TYPES",
    "TRAIN_SAMPLERS",
    "TrainConfig",
]

GONE = "EveryDream2 itself no longer has it"


def _deprecated(default: Any, help: str, note: str, **rules: Any) -> Any:
    """An EveryDream2 key that is accepted and does nothing here (a warning when set)."""
    return setting(default, help, status="deprecated", note=note, group="everydream2", **rules)


@dataclass(frozen=True)
class TrainConfig(TrainingKeys):
    """A run's settings from train.json and the command line (optimizer values excepted).

    The keys of the model, data, optimizer and training step are declared in `TrainingKeys`
    (they come first); outputs, EMA, validation and EveryDream2's old keys here.
    """

    # --- outputs --------------------------------------------------------------------------
    project_name: str = setting(
        "myproj",
        "Name of the run folder and the checkpoints (a plain name, no path separators).",
        text="name",
        max_bytes=lim.MAX_PROJECT_NAME_BYTES,
        group="logging",
    )
    run_name: str | None = setting(
        None, "Added to the run folder's name (a plain name).", text="name", group="logging"
    )
    logdir: str = setting(
        "logs",
        "Folder for run folders (logs, samples, checkpoints).",
        text="path",
        group="logging",
    )
    log_step: int = setting(
        25,
        "Log scalars to TensorBoard every n steps.",
        minimum=1,
        maximum=lim.MAX_STEPS,
        group="logging",
    )
    sample_prompts: str | None = setting(
        None,
        "Prompts for samples: a .txt (one a line) or .json of settings; null disables.",
        text="path",
        group="samples",
    )
    sample_steps: int = setting(
        250,
        "Make samples every n optimizer steps.",
        minimum=1,
        maximum=lim.MAX_STEPS,
        group="samples",
    )
    save_ckpt_dir: str | None = setting(
        None,
        "Folder for checkpoints; null puts them in the run folder.",
        text="path",
        group="checkpoints",
    )
    save_every_n_epochs: int | None = setting(
        None,
        "Save a checkpoint every n epochs; null or 0 disables.",
        minimum=0,
        maximum=lim.MAX_EPOCHS,
        group="checkpoints",
    )
    ckpt_every_n_minutes: float | None = setting(
        None,
        "Save a checkpoint every n minutes; null or 0 disables.",
        minimum=0.0,
        maximum=lim.MAX_MINUTES,
        group="checkpoints",
    )
    save_ckpts_from_n_epochs: int = setting(
        0,
        "Do not save periodic checkpoints before this epoch.",
        minimum=0,
        maximum=lim.MAX_EPOCHS,
        group="checkpoints",
    )
    save_optimizer: bool = setting(
        False,
        "Keep optimizer state in periodic checkpoints (the final one always has it).",
        group="checkpoints",
    )
    save_full_precision: bool = setting(
        False, "Save weights in fp32 instead of fp16.", group="checkpoints"
    )
    no_prepend_last: bool = setting(
        False, "Do not prefix the final checkpoint's folder name with 'last-'.", group="checkpoints"
    )
    load_settings_every_epoch: bool = setting(
        False,
        "Read train.json again before each epoch; the keys the loop reads as it goes change "
        "(see docs/checkpoints.md).",
        group="logging",
    )
    wandb: bool = setting(
        False,
        "Also log scalars and sample images to Weights & Biases (project: project_name, run: "
        "run_name); WANDB_MODE=offline works without a network.",
        group="logging",
    )
    plugins: list[str] | None = setting(
        None,
        "EveryDream2 plugins to load, each 'module.Class' (a subclass of "
        "plugins.plugins.BasePlugin); see docs/plugins.md.",
        group="logging",
    )
    no_save_ckpt: bool = setting(
        False,
        "Do not write the single .safetensors file beside each checkpoint.",
        group="checkpoints",
    )

    # --- EMA: an exponential moving average of the trained weights (training/ema.py) ------
    ema_decay_rate: float | None = setting(
        None,
        "Enables EMA: every ema_update_interval optimizer steps, ema = ema x rate + weights x "
        "(1 - rate). Close to 1 (0.99 .. 0.9999).",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
        exclusive_maximum=True,
        group="ema",
    )
    ema_strength_target: float | None = setting(
        None,
        "Enables EMA with the decay rate for which the starting weights keep this share of the "
        "EMA at the end of the run: rate = target ^ (1 / (run steps / ema_update_interval)).",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
        exclusive_maximum=True,
        group="ema",
    )
    ema_update_interval: int = setting(
        500,
        "Update the EMA every n optimizer steps.",
        minimum=1,
        maximum=lim.MAX_STEPS,
        group="ema",
    )
    ema_device: str = setting(
        "cpu",
        "Where the EMA copy lives: cpu (system memory) or cuda (the training device; on a "
        "machine without CUDA that is the CPU).",
        choices=EMA_DEVICES,
        group="ema",
    )
    ema_sample_nonema_model: bool = setting(
        False,
        "With EMA: also make samples with the trained (non-EMA) weights.",
        group="ema",
    )
    ema_sample_ema_model: bool = setting(
        False,
        "With EMA: make samples with the EMA weights (also what happens when neither ema_sample_* "
        "key is true).",
        group="ema",
    )
    ema_resume_model: str | None = setting(
        None,
        "With EMA: the model whose UNet/text encoder weights start the EMA (anything "
        "resume_ckpt takes; findlast: this project's newest _ema checkpoint); null: the "
        "weights training starts from.",
        text="path",
        group="ema",
    )

    # --- EveryDream2 keys that do nothing here ----------------------------------------------
    amp: bool = _deprecated(
        True, "EveryDream2's AMP switch.", "mixed_precision (or disable_amp) decides"
    )
    disable_xformers: bool = _deprecated(
        False,
        "EveryDream2's xformers switch.",
        "attention always uses PyTorch SDPA unless attn_type says otherwise",
    )
    useadam8bit: bool = _deprecated(
        False, "EveryDream2's old AdamW8bit switch.", "choose the optimizer in optimizer.json"
    )
    notebook: bool = _deprecated(False, "EveryDream2's notebook switch.", "it changed nothing")
    ed1_mode: bool = _deprecated(
        False, "EveryDream 1 compatibility switch of old EveryDream2 presets.", GONE
    )
    lowvram: bool = _deprecated(
        False,
        "EveryDream2's old low-VRAM preset.",
        GONE + "; use gradient_checkpointing and a smaller batch_size",
    )
    scale_lr: bool = _deprecated(
        False, "EveryDream2's old LR scaling by batch size.", GONE + "; lr is used as given"
    )
    train_sampler: str = _deprecated(
        "ddpm",
        "EveryDream2's training noise scheduler class.",
        "diffusers' DDPM, PNDM and DDIM schedulers add noise (and compute v-prediction "
        "targets) with the same code, so training always uses DDPM",
        choices=TRAIN_SAMPLERS,
    )

    # --- validation (config/validation_config.py) -------------------------------------------
    validation_config: str | None = setting(
        None,
        "EveryDream2's validation settings file (validation_default.json); null disables "
        "validation. See docs/validation.md.",
        text="path",
        group="logging",
    )
