"""optimizer.json: its schema, and the merge with train.json and the CLI (docs/configuration.md).

Precedence, lowest first: built-in defaults < optimizer.json < train.json < typed CLI flags.
Only ``lr``, ``lr_scheduler``, ``lr_warmup_steps`` and ``lr_decay_steps`` exist in train.json;
they replace the ``base`` section's values. The text encoder copies every null of
``text_encoder_overrides`` from the resolved base; its LR, when copied, is scaled by
``text_encoder_lr_scale``. Every resolved value records where it came from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import limits as lim
from config.choices import LR_SCHEDULERS
from config.errors import ConfigError
from config.fields import parse_fields, setting
from config.jsonfile import read_json_object
from config.load import CLI_SOURCE, TRAIN_JSON, LoadedTrainConfig, find_input_file
from optimizer.freezing import FreezingConfig, parse_freezing
from optimizer.registry import OPTIMIZERS, optimizer_names

logger = logging.getLogger(__name__)

OPTIMIZER_JSON = "optimizer.json"
INHERITED = "inherited from base"
SCALED = "scaled from base"
DEFAULT = "default"
USER_SOURCES = (OPTIMIZER_JSON, TRAIN_JSON, CLI_SOURCE)
MAIN_KEYS = ("lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps")
ADAPTIVE_MIN_LR = 1e-4
ADAPTIVE_MIN_WEIGHT_DECAY = 1e-3


@dataclass(frozen=True)
class OptimizerSection:
    """The ``base`` / ``text_encoder_overrides`` keys. In a file, None means "not set"."""

    optimizer: str | None = setting(None, "Optimizer name.", choices=optimizer_names)
    lr: float | None = setting(None, "Learning rate.", minimum=0.0, maximum=lim.MAX_LR)
    lr_scheduler: str | None = setting(None, "LR schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int | None = setting(
        None,
        "Warm-up steps; null is 2% of lr_decay_steps, rounded down.",
        minimum=0,
        maximum=lim.MAX_STEPS,
    )
    lr_decay_steps: int | None = setting(
        None,
        "Steps of the schedule; null (or 0) is 1.5 x the run's optimizer steps, rounded down.",
        minimum=0,
        maximum=lim.MAX_STEPS,
    )
    betas: tuple[float, float] | None = setting(
        None,
        "Moment decay rates [beta1, beta2]; the Lion family's default is [0.9, 0.99].",
        minimum=0.0,
        maximum=lim.MAX_BETA,
    )
    epsilon: float | None = setting(
        None, "Denominator term (unused by Lion).", minimum=0.0, maximum=lim.MAX_EPSILON
    )
    weight_decay: float | None = setting(
        None, "Weight decay.", minimum=0.0, maximum=lim.MAX_WEIGHT_DECAY
    )
    d0: float | None = setting(
        None,
        "D-Adaptation/Prodigy initial D.",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=lim.MAX_D0,
    )
    decouple: bool | None = setting(None, "AdamW-style decoupled weight decay (D-Adapt/Prodigy).")
    momentum: float | None = setting(None, "SGD momentum (dadapt_sgd).", minimum=0.0, maximum=1.0)
    growth_rate: float | None = setting(
        None,
        "Cap on D's growth per step (D-Adapt/Prodigy); null or Infinity is no cap.",
        minimum=0.0,
        exclusive_minimum=True,
        allow_infinity=True,
    )
    use_bias_correction: bool | None = setting(None, "Adam bias correction (Prodigy).")
    safeguard_warmup: bool | None = setting(None, "Safeguard D during warm-up (Prodigy).")
    slice_p: int | None = setting(
        None, "Prodigy: estimate D on every p-th element.", minimum=1, maximum=lim.MAX_SLICE_P
    )
    no_prox: bool | None = setting(
        None, "EveryDream2's dadapt_adan key; accepted, used by no optimizer here."
    )


SECTION_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerSection))

BUILTIN = OptimizerSection(
    optimizer="adamw8bit",
    lr=1e-6,
    lr_scheduler="constant",
    lr_warmup_steps=None,  # computed from the run length
    lr_decay_steps=None,  # computed from the run length
    betas=(0.9, 0.999),
    epsilon=1e-8,
    weight_decay=0.01,
    d0=1e-6,
    decouple=True,
    momentum=0.0,
    growth_rate=math.inf,
    use_bias_correction=True,
    safeguard_warmup=True,
    slice_p=1,
    no_prox=False,
)

# The Lion paper and its libraries (lion-pytorch, bitsandbytes, dadaptation) use betas
# (0.9, 0.99); AdamW's (0.9, 0.999) would slow Lion's momentum down tenfold.
LION_BETAS = (0.9, 0.99)
DEFAULT_BETAS = {"lion": LION_BETAS, "lion8bit": LION_BETAS, "dadapt_lion": LION_BETAS}


def default_betas(optimizer: str) -> tuple[tuple[float, float], str]:
    """The betas an optimizer gets when nothing sets them, and that value's source."""
    if optimizer in DEFAULT_BETAS:
        return DEFAULT_BETAS[optimizer], f"default for {optimizer}"
    assert BUILTIN.betas is not None
    return BUILTIN.betas, DEFAULT


@dataclass(frozen=True)
class OptimizerFile:
    """The top-level scalar keys of optimizer.json (sections are parsed on their own)."""

    doc: Any = setting(None, "Free text, ignored.")
    base: Any = setting(None, "UNet optimizer (and defaults for the text encoder).")
    text_encoder_overrides: Any = setting(None, "Text-encoder optimizer; null keys copy base.")
    text_encoder_2_overrides: Any = setting(
        None,
        "SDXL's second text encoder: lr, betas, epsilon, weight_decay of its own; null keys copy "
        "the text encoder's.",
    )
    text_encoder_lr_scale: float | None = setting(
        None,
        "Copied text-encoder LR = base LR x this (default 1.0).",
        minimum=0.0,
        maximum=lim.MAX_LR_SCALE,
    )
    text_encoder_freezing: Any = setting(None, "Which text-encoder parts to freeze.")
    apply_grad_scaler_step_tweaks: bool | None = setting(
        None, "EveryDream2's grad-scaler growth tweaks (default true)."
    )
    log_grad_norm: bool | None = setting(None, "Log gradient norms (default true).")


FILE_ALIASES = {"text_encder_lr_scale": "text_encoder_lr_scale"}
TOP_DEFAULTS = {
    "text_encoder_lr_scale": 1.0,
    "apply_grad_scaler_step_tweaks": True,
    "log_grad_norm": True,
}


@dataclass(frozen=True)
class ModelOptimizer:
    """One model's resolved optimizer settings and where each value came from."""

    settings: OptimizerSection
    sources: dict[str, str]
    user_set: frozenset[str]  # keys set in a file or on the CLI (directly or via base)

    @property
    def name(self) -> str:
        assert self.settings.optimizer is not None
        return self.settings.optimizer

    def value(self, key: str) -> Any:
        return getattr(self.settings, key)

    def unused_keys(self) -> list[str]:
        """Keys the chosen optimizer does not take that are set or commonly expected."""
        takes = OPTIMIZERS[self.name].takes
        common = ("betas", "epsilon", "weight_decay")
        return [
            key
            for key in SECTION_KEYS
            if key not in takes
            and key not in MAIN_KEYS
            and key != "optimizer"
            and (key in common or key in self.user_set)
        ]


# What text_encoder_2_overrides may set: the values one optimizer keeps per parameter group.
GROUP_KEYS = ("lr", "betas", "epsilon", "weight_decay")


@dataclass(frozen=True)
class OptimizerConfig:
    """Everything optimizer.json, train.json and the CLI say about optimizing both models."""

    unet: ModelOptimizer
    text_encoder: ModelOptimizer
    text_encoder_freezing: FreezingConfig
    apply_grad_scaler_step_tweaks: bool
    log_grad_norm: bool
    text_encoder_lr_scale: float
    path: Path | None
    top_sources: dict[str, str]
    # SDXL's second encoder: its parameter group's values (GROUP_KEYS), in the text encoder's
    # optimizer, and where each came from.
    text_encoder_2: dict[str, Any] = dataclasses.field(default_factory=dict)
    text_encoder_2_sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def sources(self) -> dict[str, str]:
        """Provenance of every resolved value, keyed ``unet.lr``, ``text_encoder.betas``, ..."""
        out = {f"unet.{k}": v for k, v in self.unet.sources.items()}
        out |= {f"text_encoder.{k}": v for k, v in self.text_encoder.sources.items()}
        out |= {f"text_encoder_2.{k}": v for k, v in self.text_encoder_2_sources.items()}
        out |= self.top_sources
        return out

    def text_encoder_2_own(self) -> dict[str, Any]:
        """The values text_encoder_2_overrides sets itself (the rest are the text encoder's)."""
        return {
            key: value
            for key, value in self.text_encoder_2.items()
            if self.text_encoder_2_sources.get(key) == OPTIMIZER_JSON
        }

    def where(self, key_path: str) -> str:
        """The file and key path, for messages."""
        return f"{self.path or 'built-in optimizer defaults'}: {key_path}"


def load_optimizer_config(train: LoadedTrainConfig) -> OptimizerConfig:
    """Read the optimizer.json that train.json/CLI name (if any) and resolve it."""
    name = train.config.optimizer_config
    if name is None:
        logger.info("optimizer_config not set: built-in optimizer defaults (%s)", BUILTIN.optimizer)
        return resolve_optimizer_config({}, None, train)
    path = find_input_file(name, train.folder, "optimizer_config")
    return resolve_optimizer_config(read_json_object(path, "optimizer config"), path, train)


def resolve_optimizer_config(
    data: dict[str, Any], path: Path | None, train: LoadedTrainConfig
) -> OptimizerConfig:
    """Validate optimizer.json's content and merge it with the main config."""
    where = str(path) if path is not None else OPTIMIZER_JSON
    top, problems = parse_fields(OptimizerFile, data, where, aliases=FILE_ALIASES)
    for old, new in FILE_ALIASES.items():
        if old in data:
            logger.warning("%s: '%s' is deprecated, write '%s'", where, old, new)
    base, p1 = _parse_section(top.get("base"), where, "base")
    te, p2 = _parse_section(top.get("text_encoder_overrides"), where, "text_encoder_overrides")
    freezing, p3 = parse_freezing(top.get("text_encoder_freezing"), where)
    te2, p4 = _parse_section(top.get("text_encoder_2_overrides"), where, "text_encoder_2_overrides")
    problems += p1 + p2 + p3 + p4 + _group_only(te2, where)
    if problems:
        raise ConfigError(problems)

    unet = _resolve_base(base, train, where)
    scale_given = top.get("text_encoder_lr_scale")
    scale = TOP_DEFAULTS["text_encoder_lr_scale"] if scale_given is None else scale_given
    text_encoder = _resolve_text_encoder(te, unet, scale, scale_given is not None)
    te2_values, te2_sources = _resolve_text_encoder_2(te2, text_encoder)
    top_values = {k: top.get(k, default) for k, default in TOP_DEFAULTS.items()}
    top_sources = {k: OPTIMIZER_JSON if k in top else DEFAULT for k in TOP_DEFAULTS}
    config = OptimizerConfig(
        unet=unet,
        text_encoder=text_encoder,
        text_encoder_freezing=freezing,
        apply_grad_scaler_step_tweaks=top_values["apply_grad_scaler_step_tweaks"],
        log_grad_norm=top_values["log_grad_norm"],
        text_encoder_lr_scale=scale,
        path=path,
        top_sources=top_sources,
        text_encoder_2=te2_values,
        text_encoder_2_sources=te2_sources,
    )
    _warn_adaptive(config)
    return config


def _parse_section(raw: Any, where: str, key: str) -> tuple[OptimizerSection, list[str]]:
    if raw is None:
        return OptimizerSection(), []
    if not isinstance(raw, dict):
        return OptimizerSection(), [f"{where}: {key}: expected an object {{...}} or null"]
    values, problems = parse_fields(OptimizerSection, raw, where, key_prefix=f"{key}.")
    if values.get("lr_decay_steps") == 0:
        del values["lr_decay_steps"]  # EveryDream2's "automatic"
    return OptimizerSection(**values), problems


def _main_value(train: LoadedTrainConfig, key: str) -> tuple[Any, str] | None:
    """A main (train.json / CLI) value for one of MAIN_KEYS, with its source, if set."""
    value = getattr(train.config, key)
    source = train.sources[key]
    if value is None or source not in (TRAIN_JSON, CLI_SOURCE):
        return None
    return value, source


def _resolve_base(base: OptimizerSection, train: LoadedTrainConfig, where: str) -> ModelOptimizer:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in SECTION_KEYS:
        file_value = getattr(base, key)
        main = _main_value(train, key) if key in MAIN_KEYS else None
        if main is not None:
            values[key], sources[key] = main
            if file_value is not None and file_value != main[0]:
                logger.warning(
                    "%s %s=%s replaces %s: base.%s=%s",
                    main[1],
                    key,
                    main[0],
                    where,
                    key,
                    file_value,
                )
        elif file_value is not None:
            values[key], sources[key] = file_value, OPTIMIZER_JSON
        elif key == "betas":
            values[key], sources[key] = default_betas(values["optimizer"])
        else:
            values[key], sources[key] = getattr(BUILTIN, key), DEFAULT
    user_set = frozenset(k for k, source in sources.items() if source in USER_SOURCES)
    return ModelOptimizer(OptimizerSection(**values), sources, user_set)


def _resolve_text_encoder(
    overrides: OptimizerSection, base: ModelOptimizer, scale: float, scale_given: bool
) -> ModelOptimizer:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in SECTION_KEYS:
        own = getattr(overrides, key)
        if own is not None:
            values[key], sources[key] = own, OPTIMIZER_JSON
        elif key == "lr":
            values[key] = base.value("lr") * scale
            sources[key] = SCALED if scale_given else INHERITED
        elif key == "betas" and key not in base.user_set:
            own_default = default_betas(values["optimizer"])
            inherit = own_default[0] == base.value(key)
            values[key], sources[key] = (base.value(key), INHERITED) if inherit else own_default
        else:
            values[key], sources[key] = base.value(key), INHERITED
    user_set = frozenset(
        k for k, source in sources.items() if source == OPTIMIZER_JSON or k in base.user_set
    )
    return ModelOptimizer(OptimizerSection(**values), sources, user_set)


def _group_only(section: OptimizerSection, where: str) -> list[str]:
    """text_encoder_2_overrides sets only what a parameter group of one optimizer can hold."""
    return [
        f"{where}: text_encoder_2_overrides.{key}: the second text encoder shares the text "
        f"encoder's optimizer; it may set only {', '.join(GROUP_KEYS)}"
        for key in SECTION_KEYS
        if key not in GROUP_KEYS and getattr(section, key) is not None
    ]


def _resolve_text_encoder_2(
    overrides: OptimizerSection, text_encoder: ModelOptimizer
) -> tuple[dict[str, Any], dict[str, str]]:
    """The second encoder's group values: its own, else the text encoder's."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in GROUP_KEYS:
        own = getattr(overrides, key)
        if own is None:
            values[key], sources[key] = text_encoder.value(key), "inherited from text_encoder"
        else:
            values[key], sources[key] = own, OPTIMIZER_JSON
    return values, sources


def _warn_adaptive(config: OptimizerConfig) -> None:
    """D-Adaptation and Prodigy expect LR around 0.1-1.0 and a real weight decay."""
    for model, settings in (("unet", config.unet), ("text_encoder", config.text_encoder)):
        if not OPTIMIZERS[settings.name].adaptive:
            continue
        lr, wd = settings.value("lr"), settings.value("weight_decay")
        if lr < ADAPTIVE_MIN_LR or wd < ADAPTIVE_MIN_WEIGHT_DECAY:
            logger.warning(
                "%s uses %s with lr=%g and weight_decay=%g: this optimizer adapts its step "
                "size and expects lr around 0.1-1.0 (weight_decay around 0.8 works well)",
                model,
                settings.name,
                lr,
                wd,
            )
