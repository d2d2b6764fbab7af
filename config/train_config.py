"""The train.json schema: every key, its default and its rules, in one place.

Each field is a train.json key and a command-line flag of the same name. The keys are
EveryDream2's (so its train.json files keep working) plus a few of this trainer's own.
Keys EveryDream2 had that do nothing here are ``deprecated`` (a warning when set);
keys whose feature this trainer does not have are ``unsupported`` (an error when set to
anything but their default, never silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

from config.fields import setting

LOSS_TYPES = ("mse", "huber", "mse_huber")
ATTENTION_TYPES = ("sdp", "slice")
PREDICTION_TYPES = ("epsilon", "v_prediction")
NOT_YET = "not supported yet by this trainer"


def _scheduler_names() -> tuple[str, ...]:
    from optimizer.schedulers import scheduler_names

    return scheduler_names()


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings from train.json and the command line (optimizer values excepted)."""

    # --- model and data -------------------------------------------------------------------
    resume_ckpt: str | None = setting(
        None,
        "Model to start from: a built-in name (tiny-sd15, tiny-sd21, sd15-random, sd21-random), "
        "a local diffusers folder, a checkpoint of this trainer, a .safetensors/.ckpt single "
        "file, findlast (this project's newest checkpoint), or a hub id. Required.",
    )
    prediction_type: str | None = setting(
        None,
        "Prediction type of the model: epsilon or v_prediction; null uses the model's own.",
        choices=PREDICTION_TYPES,
    )
    data_root: str = setting("input", "Folder of training images, searched recursively.")
    resolution: int = setting(
        512, "Training resolution in pixels (buckets hold about this many squared).", minimum=64
    )
    batch_size: int = setting(2, "Images per batch (per process).", minimum=1)
    max_epochs: int = setting(300, "Number of epochs to train.", minimum=1)
    seed: int = setting(555, "Seed for shuffling, noise and samples; -1 picks one at random.")
    flip_p: float = setting(
        0.0, "Probability of flipping an image horizontally.", minimum=0.0, maximum=1.0
    )
    cond_dropout: float = setting(
        0.04, "Probability of training an image with an empty caption.", minimum=0.0, maximum=1.0
    )
    shuffle_tags: bool = setting(False, "Shuffle the comma-separated tags after the first.")
    keep_tags: int = setting(
        0, "With shuffle_tags: number of leading tags kept in place.", minimum=0
    )
    dataloader_num_workers: int | None = setting(
        None, "Image decoding worker processes; null picks a default.", minimum=0
    )
    write_schedule: bool = setting(
        False, "Write each epoch's batches (paths, captions, bucket) to the run folder."
    )
    cache_latents: bool = setting(
        False, "Encode every image once with the VAE and reuse the latents (flips included)."
    )

    # --- optimizer (overrides optimizer.json's base section) -----------------------------
    optimizer_config: str | None = setting(
        None, "optimizer.json preset; null uses the built-in optimizer defaults."
    )
    lr: float | None = setting(
        None,
        "Learning rate; overrides optimizer.json base.lr (warns when both are set).",
        minimum=0.0,
    )
    lr_scheduler: str | None = setting(
        None,
        "LR schedule name; overrides optimizer.json base.lr_scheduler.",
        choices=_scheduler_names,
    )
    lr_warmup_steps: int | None = setting(
        None, "Warm-up steps; overrides optimizer.json base.lr_warmup_steps.", minimum=0
    )
    lr_decay_steps: int | None = setting(
        None,
        "Steps of the decay; overrides optimizer.json base.lr_decay_steps. 0 means automatic "
        "(EveryDream2's convention).",
        minimum=0,
    )

    # --- the training step ----------------------------------------------------------------
    grad_accum: int = setting(1, "Micro-batches accumulated per optimizer step.", minimum=1)
    clip_grad_norm: float | None = setting(
        None,
        "Clip the gradient norm of each model to this value; null disables.",
        minimum=0.0,
        exclusive_minimum=True,
    )
    gradient_checkpointing: bool = setting(False, "Recompute activations to save memory.")
    disable_amp: bool = setting(False, "Train in full fp32 instead of mixed precision.")
    disable_textenc_training: bool = setting(False, "Do not train the text encoder.")
    disable_unet_training: bool = setting(False, "Do not train the UNet.")
    clip_skip: int = setting(
        0,
        "Use the n-th hidden state from the end of the text encoder (2 = penultimate).",
        minimum=0,
        maximum=4,
    )
    zero_frequency_noise_ratio: float = setting(
        0.02, "Offset (zero-frequency) noise strength.", minimum=0.0, maximum=1.0
    )
    pyramid_noise_discount: float | None = setting(
        None, "Enables pyramid noise with this discount.", minimum=0.0, maximum=1.0
    )
    enable_zero_terminal_snr: bool = setting(
        False, "Rescale the noise schedule to zero terminal SNR."
    )
    min_snr_gamma: float | None = setting(
        None,
        "Min-SNR loss weighting gamma (5 is common); null disables.",
        minimum=0.0,
        exclusive_minimum=True,
    )
    timestep_start: int = setting(0, "Smallest noising timestep drawn.", minimum=0)
    timestep_end: int = setting(1000, "Timesteps are drawn below this value.", minimum=1)
    loss_type: str = setting("mse", "Loss: mse, huber or mse_huber.", choices=LOSS_TYPES)
    embedding_perturbation: float = setting(
        0.0, "Std of Gaussian noise added to text embeddings.", minimum=0.0
    )
    attn_type: str = setting(
        "sdp",
        "Attention implementation: sdp (PyTorch scaled dot product) or slice.",
        choices=ATTENTION_TYPES,
    )
    compile_unet: bool = setting(False, "Compile the UNet with torch.compile (slow start-up).")
    gpuid: int = setting(0, "CUDA device index to train on.", minimum=0)

    # --- outputs --------------------------------------------------------------------------
    project_name: str = setting("myproj", "Name of the run folder and the checkpoints.")
    run_name: str | None = setting(None, "Added to the run folder's name.")
    logdir: str = setting("logs", "Folder for run folders (logs, samples, checkpoints).")
    log_step: int = setting(25, "Log scalars to TensorBoard every n steps.", minimum=1)
    sample_prompts: str | None = setting(
        None, "Prompts for samples: a .txt (one a line) or .json of settings; null disables."
    )
    sample_steps: int = setting(250, "Make samples every n optimizer steps.", minimum=1)
    save_ckpt_dir: str | None = setting(
        None, "Folder for checkpoints; null puts them in the run folder."
    )
    save_every_n_epochs: int | None = setting(
        None, "Save a checkpoint every n epochs; null or 0 disables.", minimum=0
    )
    ckpt_every_n_minutes: float | None = setting(
        None, "Save a checkpoint every n minutes; null or 0 disables.", minimum=0.0
    )
    save_ckpts_from_n_epochs: int = setting(
        0, "Do not save periodic checkpoints before this epoch.", minimum=0
    )
    save_optimizer: bool = setting(
        False, "Keep optimizer state in periodic checkpoints (the final one always has it)."
    )
    save_full_precision: bool = setting(False, "Save weights in fp32 instead of fp16.")
    no_prepend_last: bool = setting(
        False, "Do not prefix the final checkpoint's folder name with 'last-'."
    )
    no_save_ckpt: bool = setting(
        False, "Do not write the single .safetensors file beside each checkpoint."
    )

    # --- EveryDream2 keys that do nothing here ----------------------------------------------
    amp: bool = setting(
        True,
        "EveryDream2's AMP switch.",
        status="deprecated",
        note="mixed precision is on unless disable_amp is true",
    )
    disable_xformers: bool = setting(
        False,
        "EveryDream2's xformers switch.",
        status="deprecated",
        note="attention always uses PyTorch SDPA unless attn_type says otherwise",
    )
    useadam8bit: bool = setting(
        False,
        "EveryDream2's old AdamW8bit switch.",
        status="deprecated",
        note="choose the optimizer in optimizer.json",
    )
    notebook: bool = setting(
        False, "EveryDream2's notebook switch.", status="deprecated", note="it changed nothing"
    )

    # --- EveryDream2 features this trainer does not have --------------------------------------
    lowvram: bool = setting(
        False,
        "EveryDream2's low-VRAM preset.",
        status="unsupported",
        note=NOT_YET + "; use gradient_checkpointing and batch_size",
    )
    scale_lr: bool = setting(False, "EveryDream2's LR scaling.", status="unsupported", note=NOT_YET)
    wandb: bool = setting(False, "Weights & Biases logging.", status="unsupported", note=NOT_YET)
    validation_config: str | None = setting(
        None, "Validation settings file.", status="unsupported", note=NOT_YET
    )
    plugins: list[str] | None = setting(
        None, "Plugins to load.", status="unsupported", note=NOT_YET
    )
    rated_dataset: bool = setting(False, "Rated image sets.", status="unsupported", note=NOT_YET)
    rated_dataset_target_dropout_percent: int = setting(
        50, "Rated image sets.", status="unsupported", note=NOT_YET
    )
    load_settings_every_epoch: bool = setting(
        False, "Reload train.json every epoch.", status="unsupported", note=NOT_YET
    )
    ema_decay_rate: float | None = setting(None, "EMA.", status="unsupported", note=NOT_YET)
    ema_strength_target: float | None = setting(None, "EMA.", status="unsupported", note=NOT_YET)
    ema_update_interval: int = setting(500, "EMA.", status="unsupported", note=NOT_YET)
    ema_device: str = setting("cpu", "EMA.", status="unsupported", note=NOT_YET)
    ema_sample_nonema_model: bool = setting(False, "EMA.", status="unsupported", note=NOT_YET)
    ema_sample_ema_model: bool = setting(False, "EMA.", status="unsupported", note=NOT_YET)
    ema_resume_model: str | None = setting(None, "EMA.", status="unsupported", note=NOT_YET)
