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
class TrainConfig:
    """A run's settings from train.json and the command line (optimizer values excepted)."""

    # --- model and data -------------------------------------------------------------------
    resume_ckpt: str | None = setting(
        None,
        "Model to start from: a built-in name (tiny-sd15, tiny-sd21, sd15-random, sd21-random), "
        "a local diffusers folder, a checkpoint of this trainer, a .safetensors/.ckpt single "
        "file, findlast (this project's newest checkpoint), or a hub id. Required.",
        text="path",
        group="model",
    )
    prediction_type: str | None = setting(
        None,
        "Prediction type of the model: epsilon or v_prediction; null uses the model's own.",
        choices=PREDICTION_TYPES,
        group="model",
    )
    data_root: str = setting(
        "input", "Folder of training images, searched recursively.", text="path", group="data"
    )
    resolution: int = setting(
        512,
        "Training resolution in pixels (buckets hold about this many squared).",
        minimum=64,
        maximum=lim.MAX_RESOLUTION,
        multiple_of=64,
        group="data",
    )
    batch_size: int = setting(
        2, "Images per batch (per process).", minimum=1, maximum=lim.MAX_BATCH_SIZE, group="data"
    )
    max_epochs: int = setting(
        300, "Number of epochs to train.", minimum=1, maximum=lim.MAX_EPOCHS, group="schedule"
    )
    seed: int = setting(
        555,
        "Seed for shuffling, noise and samples; -1 picks one at random.",
        minimum=lim.RANDOM_SEED,
        maximum=lim.MAX_SEED,
        group="data",
    )
    flip_p: float = setting(
        0.0,
        "Probability of flipping an image horizontally.",
        minimum=0.0,
        maximum=1.0,
        group="data",
    )
    cond_dropout: float = setting(
        0.04,
        "Probability of training an image with an empty caption.",
        minimum=0.0,
        maximum=1.0,
        group="data",
    )
    shuffle_tags: bool = setting(
        False, "Shuffle the comma-separated tags after the first.", group="data"
    )
    keep_tags: int = setting(
        0,
        "With shuffle_tags: number of tags after the first kept in place.",
        minimum=0,
        maximum=lim.MAX_TAGS,
        group="data",
    )
    dataloader_num_workers: int | None = setting(
        None,
        "Image decoding worker processes; null picks a default.",
        minimum=0,
        maximum=lim.MAX_WORKERS,
        group="data",
    )
    write_schedule: bool = setting(
        False,
        "Write each epoch's batches (paths, captions, bucket) to the run folder.",
        group="data",
    )
    cache_latents: bool = setting(
        False,
        "Encode every image once with the VAE and reuse the latents (flips included).",
        group="data",
    )
    rated_dataset: bool = setting(
        False,
        "Train less often on images with a lower yaml `rating`: from the third epoch on, each "
        "epoch keeps fewer images, drawn by rating (EveryDream2's rated dataset).",
        group="data",
    )
    rated_dataset_target_dropout_percent: int = setting(
        50,
        "With rated_dataset: roughly the percentage of images the last epoch keeps.",
        minimum=0,
        maximum=100,
        group="data",
    )

    # --- optimizer (overrides optimizer.json's base section) -----------------------------
    optimizer_config: str | None = setting(
        None,
        "optimizer.json preset; null uses the built-in optimizer defaults.",
        text="path",
        group="optimizer",
    )
    lr: float | None = setting(
        None,
        "Learning rate; overrides optimizer.json base.lr (warns when both are set).",
        minimum=0.0,
        maximum=lim.MAX_LR,
        group="optimizer",
    )
    lr_scheduler: str | None = setting(
        None,
        "LR schedule name; overrides optimizer.json base.lr_scheduler.",
        choices=LR_SCHEDULERS,
        group="schedule",
    )
    lr_warmup_steps: int | None = setting(
        None,
        "Warm-up steps; overrides optimizer.json base.lr_warmup_steps.",
        minimum=0,
        maximum=lim.MAX_STEPS,
        group="schedule",
    )
    lr_decay_steps: int | None = setting(
        None,
        "Steps of the decay; overrides optimizer.json base.lr_decay_steps. 0 means automatic "
        "(EveryDream2's convention).",
        minimum=0,
        maximum=lim.MAX_STEPS,
        group="schedule",
    )

    # --- the training step ----------------------------------------------------------------
    grad_accum: int = setting(
        1,
        "Micro-batches accumulated per optimizer step.",
        minimum=1,
        maximum=lim.MAX_GRAD_ACCUM,
        group="optimizer",
    )
    clip_grad_norm: float | None = setting(
        None,
        "Clip the gradient norm of each model to this value; null disables.",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=lim.MAX_CLIP_GRAD_NORM,
        group="optimizer",
    )
    gradient_checkpointing: bool = setting(
        False, "Recompute activations to save memory.", group="model"
    )
    mixed_precision: str = setting(
        "auto",
        "Autocast dtype: auto (bf16 on GPUs with native bf16, fp16 with a grad scaler on older "
        "GPUs, none on the CPU), bf16, fp16 (with a grad scaler) or no (fp32); on the CPU too.",
        choices=MIXED_PRECISIONS,
        group="model",
    )
    disable_amp: bool = setting(
        False, "Train in full fp32 (the same as mixed_precision: no).", group="model"
    )
    disable_textenc_training: bool = setting(False, "Do not train the text encoder.", group="model")
    disable_unet_training: bool = setting(False, "Do not train the UNet.", group="model")
    clip_skip: int = setting(
        0,
        "Use the n-th hidden state from the end of the text encoder (2 = penultimate).",
        minimum=0,
        maximum=lim.MAX_CLIP_SKIP,
        group="model",
    )
    zero_frequency_noise_ratio: float = setting(
        0.02,
        "Offset (zero-frequency) noise strength.",
        minimum=0.0,
        maximum=1.0,
        group="training",
    )
    pyramid_noise_discount: float | None = setting(
        None,
        "Enables pyramid noise with this discount.",
        minimum=0.0,
        maximum=1.0,
        group="training",
    )
    enable_zero_terminal_snr: bool = setting(
        False, "Rescale the noise schedule to zero terminal SNR.", group="training"
    )
    min_snr_gamma: float | None = setting(
        None,
        "Min-SNR loss weighting gamma (5 is common); null disables.",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=lim.MAX_MIN_SNR_GAMMA,
        group="training",
    )
    timestep_start: int = setting(
        0,
        "Smallest noising timestep drawn.",
        minimum=0,
        maximum=lim.MAX_TIMESTEPS - 1,
        group="training",
    )
    timestep_end: int = setting(
        1000,
        "Timesteps are drawn below this value.",
        minimum=1,
        maximum=lim.MAX_TIMESTEPS,
        group="training",
    )
    loss_type: str = setting(
        "mse",
        "Loss: mse, huber, or EveryDream2's timestep blends mse_huber (MSE when noisy) and "
        "huber_mse (Huber when noisy).",
        choices=LOSS_TYPES,
        group="training",
    )
    embedding_perturbation: float = setting(
        0.0,
        "Std of Gaussian noise added to text embeddings.",
        minimum=0.0,
        maximum=lim.MAX_EMBEDDING_PERTURBATION,
        group="training",
    )
    attn_type: str = setting(
        "sdp",
        "Attention implementation: sdp (PyTorch scaled dot product) or slice; EveryDream2's "
        "xformers is read as sdp.",
        choices=ATTENTION_TYPES,
        group="model",
    )
    compile_unet: bool = setting(
        False, "Compile the UNet with torch.compile (slow start-up).", group="model"
    )
    gpuid: int = setting(
        0, "CUDA device index to train on.", minimum=0, maximum=lim.MAX_GPU_INDEX, group="model"
    )

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
        "(see the README's list).",
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
        "plugins.plugins.BasePlugin); see the README's Plugins section.",
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

    # --- EveryDream2 features this trainer does not have --------------------------------------
    validation_config: str | None = setting(
        None,
        "EveryDream2's validation settings file (validation_default.json); null disables "
        "validation. See the README's Validation section.",
        text="path",
        group="logging",
    )
