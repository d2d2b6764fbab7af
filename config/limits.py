"""The largest values a run accepts, in one place, with the reason for each.

Every number of train.json, optimizer.json and sample_prompts.json has a maximum (declared with
its key in ``setting(...)``), so that a typo such as a batch size of 1e18 or a resolution of
10^12 is one clear message at start-up instead of a MemoryError, an overflow or a hang later.
Names and paths are limited to what the file system takes, counting UTF-8 bytes.
"""

from __future__ import annotations

# --- run length ---------------------------------------------------------------------------
MAX_EPOCHS = 100_000
# Optimizer steps in one run (epochs x steps per epoch): 10^8 steps is years at real speeds;
# the bound also fixes the digits of the step number in checkpoint names (9).
MAX_STEPS = 100_000_000

# --- sizes --------------------------------------------------------------------------------
# Pixels per side. EveryDream2's largest bucket set is 1536; 8192 leaves room for any GPU.
MAX_RESOLUTION = 8192
MAX_BATCH_SIZE = 1024  # images per process and micro-batch
MAX_GRAD_ACCUM = 1024
MAX_WORKERS = 256  # data loader processes
MAX_TAGS = 10_000  # keep_tags: more than any caption holds
MAX_GPU_INDEX = 1023
MAX_TIMESTEPS = 1000  # Stable Diffusion 1.x/2.x train with 1000 noising timesteps
MAX_CLIP_SKIP = 4  # EveryDream2's choices: 0-4
MAX_TEXT_ENCODER_LAYERS = 1000  # freezing counts: far more than any CLIP text encoder has
# LoRA rank: past the width of the layers it adapts (320 to 1280 in SD's UNet, 768/1024 in its
# text encoders) a rank adds parameters and nothing else; kohya users train 4 to 256.
MAX_LORA_RANK = 1024
# LoRA alpha: the adapter's output is scaled by alpha / rank; 10^4 is far past any useful scale.
MAX_LORA_ALPHA = 10_000.0

# --- seeds --------------------------------------------------------------------------------
# -1 asks for a random seed. 2^32 - 1 is the largest seed every common generator takes
# (torch takes 64 bits; numpy, which accelerate's set_seed and EveryDream2 seed, 32).
RANDOM_SEED = -1
MAX_SEED = 2**32 - 1

# --- optimizer values ---------------------------------------------------------------------
MAX_LR = 10.0  # D-Adaptation and Prodigy use about 1.0; AdamW about 1e-6 .. 1e-4
MAX_LR_SCALE = 100.0
MAX_WEIGHT_DECAY = 10.0
MAX_EPSILON = 1.0
MAX_BETA = 0.999999  # a beta of 1 never forgets: the moment estimate stops moving
MAX_D0 = 1.0
MAX_SLICE_P = 1024
MAX_CLIP_GRAD_NORM = 1e6
MAX_MIN_SNR_GAMMA = 1000.0
MAX_INPUT_PERTURBATION = 1.0  # noise on noise: more would swamp the target
MAX_EMBEDDING_PERTURBATION = 10.0
MAX_MINUTES = 1_000_000.0  # ckpt_every_n_minutes: about two years

# --- samples ------------------------------------------------------------------------------
MAX_GUIDANCE_SCALE = 100.0
MAX_INFERENCE_STEPS = MAX_TIMESTEPS  # diffusers refuses more steps than training timesteps

# --- names and paths (bytes of UTF-8) -----------------------------------------------------
PATH_MAX_BYTES = 4096  # Linux PATH_MAX, terminating NUL included
NAME_MAX_BYTES = 255  # one file or folder name (ext4, xfs, btrfs, NTFS, APFS)
# project_name is part of every checkpoint name; the longest file name a run makes from it is
# the temporary folder of an interrupted checkpoint with an EMA copy, written beside a
# single-file checkpoint:
#   .interrupted-<project_name>-ep<epoch>-gs<step>_ema.safetensors.partial-<pid>-<8 chars>
# 1 + 12 + 3 + 6 + 3 + 9 + 4 + 12 + 9 + 7 + 1 + 8 = 75 bytes around the name (epoch <= 10^5,
# step <= 10^8, pid <= 2^22), rounded up to 80.
NAME_RESERVE_BYTES = 80
MAX_PROJECT_NAME_BYTES = NAME_MAX_BYTES - NAME_RESERVE_BYTES
# The run folder is <project_name>_<YYYYmmdd-HHMMSS>[_<run_name>][-<6 digits if it existed>].
RUN_FOLDER_EXTRA_BYTES = len("_20240101-000000_") + len("-123456")
# Below logdir (and save_ckpt_dir) a run writes <run folder>/<checkpoint>/<part>/<file>:
# two names of up to 255 bytes and a few short ones.
OUTPUT_PATH_RESERVE_BYTES = 1024
MAX_OUTPUT_FOLDER_BYTES = PATH_MAX_BYTES - OUTPUT_PATH_RESERVE_BYTES
