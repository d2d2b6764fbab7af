"""Loading train.json and the command line into a validated `TrainConfig` with provenance."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import limits
from config.cli import CLI, CommandLine
from config.ema import ema_problems
from config.errors import ConfigError, UserError
from config.fields import defaults_of, parse_fields, rule_of
from config.jsonfile import read_json_object
from config.lora import lora_problems
from config.train_config import TrainConfig

logger = logging.getLogger(__name__)

DEFAULT = "default"
TRAIN_JSON = "train.json"
CLI_SOURCE = "cli"


@dataclass(frozen=True)
class LoadedTrainConfig:
    """The validated train settings, where each came from, and where train.json lives."""

    config: TrainConfig
    sources: dict[str, str]
    path: Path | None

    @property
    def folder(self) -> Path | None:
        """The folder of train.json, used to find files named relative to it."""
        return None if self.path is None else self.path.parent

    def where(self, key: str) -> str:
        """The file or command line a key came from, for messages."""
        source = self.sources[key]
        if source == CLI_SOURCE:
            return f"{CLI}: --{key}"
        if source == TRAIN_JSON:
            return f"{self.path}: {key}"
        return f"default {key}"


def load_train_config(command_line: CommandLine) -> LoadedTrainConfig:
    """Merge defaults < train.json < typed flags; raise one ConfigError listing every problem."""
    problems: list[str] = []
    file_values: dict[str, Any] = {}
    if command_line.config is not None:
        data = read_json_object(command_line.config, "train config")
        file_values, file_problems = parse_fields(TrainConfig, data, str(command_line.config))
        problems += file_problems
    cli_values, cli_problems = parse_fields(TrainConfig, command_line.values, CLI, key_prefix="--")
    problems += cli_problems

    values = defaults_of(TrainConfig)
    sources = dict.fromkeys(values, DEFAULT)
    for layer, source in ((file_values, TRAIN_JSON), (cli_values, CLI_SOURCE)):
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    loaded = LoadedTrainConfig(TrainConfig(**values), sources, command_line.config)
    loaded = _apply_legacy_conventions(loaded)
    problems += _check_feature_status(loaded)
    problems += _check_consistency(loaded)
    if problems:
        raise ConfigError(problems)
    return loaded


def _apply_legacy_conventions(loaded: LoadedTrainConfig) -> LoadedTrainConfig:
    """EveryDream2's spellings: ``"lr_decay_steps": 0`` is "automatic" (read as not set), and
    ``"attn_type": "xformers"`` is read as ``sdp`` (PyTorch's own memory-efficient attention)."""
    changes: dict[str, Any] = {}
    sources = dict(loaded.sources)
    if loaded.config.lr_decay_steps == 0:
        logger.info(
            "%s is 0: EveryDream2's way of saying 'automatic'; treated as null",
            loaded.where("lr_decay_steps"),
        )
        changes["lr_decay_steps"] = None
        sources["lr_decay_steps"] = DEFAULT
    if loaded.config.attn_type == "xformers":
        logger.warning(
            "%s is xformers: EveryDream2's xformers attention is not used here; PyTorch's "
            "scaled dot product attention (sdp) does the same job",
            loaded.where("attn_type"),
        )
        changes["attn_type"] = "sdp"
    if not changes:
        return loaded
    return LoadedTrainConfig(dataclasses.replace(loaded.config, **changes), sources, loaded.path)


def _check_feature_status(loaded: LoadedTrainConfig) -> list[str]:
    """Warn about deprecated keys that are set (they do nothing here)."""
    for f in dataclasses.fields(TrainConfig):
        rule = rule_of(f)
        if rule.status == "deprecated" and getattr(loaded.config, f.name) != f.default:
            logger.warning(
                "%s is deprecated and has no effect: %s", loaded.where(f.name), rule.note
            )
    return []


def _check_consistency(loaded: LoadedTrainConfig) -> list[str]:
    """Rules that involve more than one key."""
    c = loaded.config
    problems = []
    if c.resume_ckpt is None:
        problems.append(
            f"{loaded.path or CLI}: resume_ckpt: required (a built-in model such as "
            "'tiny-sd15', a diffusers folder or a checkpoint of this trainer)"
        )
    if c.timestep_start >= c.timestep_end:
        problems.append(
            f"{loaded.where('timestep_start')}: must be below timestep_end "
            f"({c.timestep_start} >= {c.timestep_end})"
        )
    if c.disable_amp and c.mixed_precision not in ("auto", "no"):
        problems.append(
            f"{loaded.where('disable_amp')}: true contradicts mixed_precision "
            f"'{c.mixed_precision}'; give only one of them"
        )
    if c.disable_unet_training and c.disable_textenc_training:
        problems.append(
            f"{loaded.where('disable_unet_training')}: "
            "both models are disabled; nothing would train"
        )
    if c.fused_backward_pass and c.clip_grad_norm is not None:
        problems.append(
            f"{loaded.where('fused_backward_pass')}: cannot clip gradients (clip_grad_norm "
            f"{c.clip_grad_norm:g}): each parameter steps before the others have gradients; "
            "set clip_grad_norm to null or turn fused_backward_pass off"
        )
    if c.fused_backward_pass and c.mixed_precision == "fp16":
        problems.append(
            f"{loaded.where('fused_backward_pass')}: cannot run with mixed_precision fp16 (its "
            "grad scaler checks every gradient before any step); use bf16 or no"
        )
    if c.latent_cache_dir is not None and not c.cache_latents:
        problems.append(
            f"{loaded.where('latent_cache_dir')}: needs cache_latents: true (the folder holds "
            "the latent cache); set cache_latents or remove latent_cache_dir"
        )
    if c.text_encoder_offload and c.shuffle_tags:
        problems.append(
            f"{loaded.where('text_encoder_offload')}: needs the text-embedding cache, which "
            "shuffle_tags turns off (the captions change every step); turn one of them off"
        )
    problems += ema_problems(loaded) + lora_problems(loaded)
    return problems + _check_output_names(loaded)


def _check_output_names(loaded: LoadedTrainConfig) -> list[str]:
    """The run folder's name and the output folders' paths fit the file system's limits.

    Each key is checked on its own by its rule; here their combinations: the run folder
    ``<project_name>_<timestamp>[_<run_name>]`` is one name, and the paths the run writes below
    ``logdir`` and ``save_ckpt_dir`` (absolute) must stay under PATH_MAX.
    """
    c = loaded.config
    problems = []
    run_name_bytes = 0 if c.run_name is None else len(c.run_name.encode("utf-8", "replace"))
    folder_bytes = len(c.project_name.encode("utf-8", "replace")) + run_name_bytes
    folder_bytes += limits.RUN_FOLDER_EXTRA_BYTES
    if folder_bytes > limits.NAME_MAX_BYTES:
        problems.append(
            f"{loaded.where('run_name')}: the run folder's name "
            f"<project_name>_<timestamp>_<run_name> would be {folder_bytes} bytes (UTF-8); a "
            f"name may have at most {limits.NAME_MAX_BYTES}: shorten run_name or project_name"
        )
    for key in ("logdir", "save_ckpt_dir"):
        value = getattr(c, key)
        if value is None:
            continue
        size = len(os.fsencode(os.path.abspath(value)))
        if size > limits.MAX_OUTPUT_FOLDER_BYTES:
            problems.append(
                f"{loaded.where(key)}: its absolute path is {size} bytes; at most "
                f"{limits.MAX_OUTPUT_FOLDER_BYTES} are allowed, to leave "
                f"{limits.OUTPUT_PATH_RESERVE_BYTES} for the run folders and checkpoints below "
                f"it (paths may have at most {limits.PATH_MAX_BYTES - 1} bytes)"
            )
    return problems


def find_input_file(value: str, config_folder: Path | None, key: str) -> Path:
    """Find a file named in train.json or on the command line.

    A relative path is looked up against the working directory, then against the folder of
    train.json; if neither exists the UserError names both paths.
    """
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise UserError(f"{key}: {path} does not exist")
        return path
    candidates = [Path.cwd() / path]
    if config_folder is not None:
        candidates.append(config_folder / path)
        if candidates[1].exists():
            return candidates[1]
    tried = " nor ".join(str(p) for p in candidates)
    raise UserError(f"{key}: {value} not found: neither {tried} exists")
