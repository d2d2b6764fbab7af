"""The train.json keys of the model, the data, the optimizer and the training step.

`TrainingKeys` is the first part of `config.train_config.TrainConfig` (which adds outputs,
EMA, validation and EveryDream2's old keys); see there. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from config import limits as lim
from config.choices import (
    ATTENTION_TYPES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    PREDICTION_TYPES,
)
from config.fields import setting


@dataclass(frozen=True)
class TrainingKeys:
    """What trains and how: model, data, optimizer overrides and the step."""

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
    latent_cache_dir: str | None = setting(
        None,
        "With cache_latents: keep the latents in this folder instead of memory, reused by "
        "later runs, resumes and processes (docs/performance.md#latent-cache-on-disk).",
        text="path",
        group="data",
    )
    text_encoder_offload: bool = setting(
        False,
        "Keep a frozen text encoder in CPU memory while training: its outputs come from the "
        "text-embedding cache (needs a text encoder that does not train, and no shuffle_tags).",
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
    vram_budget_gb: float | None = setting(
        None,
        "Memory the run may use on its device, in GiB: the trainer turns on the cheapest "
        "savings whose forecast fits and logs each (docs/performance.md#memory-budget); null "
        "trains with the settings as given.",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1e6,
        group="model",
    )
    fused_backward_pass: bool = setting(
        False,
        "Step each parameter as soon as its gradient is complete, so all gradients never exist "
        "at once (adamw, adamw8bit, lion, lion8bit, adafactor, came; no clip_grad_norm, fp16 or "
        "several processes).",
        group="model",
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
        "mse_huber",
        "Loss: mse, huber, or EveryDream2's timestep blends mse_huber (MSE when noisy; "
        "EveryDream2's default) and huber_mse (Huber when noisy).",
        choices=LOSS_TYPES,
        group="training",
    )
    masked_loss: bool = setting(
        False,
        "Weight the loss by each image's mask: a sidecar <image name>-masklabel.png (white "
        "trains, black does not), else the image's alpha channel.",
        group="training",
    )
    unmasked_weight: float = setting(
        0.0,
        "With masked_loss: the weight of the loss outside the mask (0 to 1).",
        minimum=0.0,
        maximum=1.0,
        group="training",
    )
    normalize_masked_area_loss: bool = setting(
        False,
        "With masked_loss: divide each image's loss by its mask's weight instead of its area, "
        "so a small mask counts as much as a large one.",
        group="training",
    )
    debiased_estimation: bool = setting(
        False,
        "Weight each image's loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction), SNR capped at "
        "1000: kohya's debiased estimation.",
        group="training",
    )
    input_perturbation: float = setting(
        0.0,
        "Noise the latents with noise + input_perturbation * randn while the target keeps the "
        "plain noise (diffusers' input perturbation; 0.1 is its suggestion); 0 is off.",
        minimum=0.0,
        maximum=lim.MAX_INPUT_PERTURBATION,
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

    # --- LoRA / LoCon adapters (lora/) ----------------------------------------------------
    lora_rank: int = setting(
        0,
        "Train LoRA adapters of this rank instead of the weights (kohya's network_dim); 0 is a "
        "full fine-tune.",
        minimum=0,
        maximum=lim.MAX_LORA_RANK,
        group="lora",
    )
    lora_alpha: float | None = setting(
        None,
        "LoRA alpha: the adapters' output is scaled by alpha / rank; null is the rank (scale 1).",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=lim.MAX_LORA_ALPHA,
        group="lora",
    )
    lora_dropout: float = setting(
        0.0,
        "Dropout on the adapters' input while training (peft's lora_dropout).",
        minimum=0.0,
        maximum=1.0,
        exclusive_maximum=True,
        group="lora",
    )
    lora_conv_rank: int = setting(
        0,
        "LoCon: also adapt the UNet's 3x3 convolutions (ResNet blocks, down/upsamplers) at this "
        "rank (kohya's conv_dim); 0 is off. Needs lora_rank.",
        minimum=0,
        maximum=lim.MAX_LORA_RANK,
        group="lora",
    )
    lora_conv_alpha: float | None = setting(
        None,
        "LoCon alpha of the 3x3 convolutions; null is lora_conv_rank (scale 1).",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=lim.MAX_LORA_ALPHA,
        group="lora",
    )
    lora_init: str | None = setting(
        None,
        "A LoRA file (kohya or diffusers format, or a folder holding "
        "pytorch_lora_weights.safetensors) whose adapters training starts from. Needs lora_rank.",
        text="path",
        group="lora",
    )
    lora_merge: bool = setting(
        False,
        "Also write the base model with the adapters merged into it, as a full checkpoint and "
        "single file. Needs lora_rank.",
        group="lora",
    )
    lora_base_dtype: str = setting(
        "fp32",
        "LoRA runs: the dtype the frozen base weights (the UNet's and the text encoders', not "
        "the VAE's) are kept in on the training device; bf16 halves their memory (an SDXL LoRA "
        "on a 12 GB card). Needs mixed_precision of the same dtype; not with lora_merge.",
        choices=("fp32", "bf16", "fp16"),
        group="lora",
    )
