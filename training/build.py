"""Building everything a run needs from validated configuration: data, models, optimizers."""

from __future__ import annotations

import dataclasses
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from config.cli import CommandLine
from config.errors import UserError
from config.load import LoadedTrainConfig, find_input_file, load_train_config
from config.train_config import TrainConfig
from data import DataSettings, TrainDataset, load_dataset
from lora.settings import LoraSettings
from models import ModelBundle, classify_resume_ckpt, load_models
from models.loading import SourceKind
from optimizer.build import (
    FreezeReport,
    ModelTraining,
    build_model_training,
    freeze_text_encoders,
)
from optimizer.config import OptimizerConfig, load_optimizer_config
from plugins.loading import load_plugins
from plugins.plugins import BasePlugin
from plugins.runner import PluginTransforms
from training.before_models import check_before_models, with_family_resolution
from training.checkpointing.find_last import resolve_findlast
from training.checkpointing.names import check_output_names, longest_checkpoint_dir
from training.checkpointing.state import (
    TrainingState,
    check_fingerprint,
    has_training_state,
    load_training_state,
)
from training.checkpointing.writer import restore_full_precision_weights
from training.disk_cache import check_cache_dir
from training.distributed import FsdpOptions, make_accelerator, training_device
from training.ema import EmaSettings, ema_memory, ema_settings
from training.fsdp import check_fsdp
from training.length import RunLength, optimizer_steps
from training.lora_setup import (
    add_run_adapters,
    lora_export,
    store_base_weights,
    weights_source,
)
from training.planner import fit_budget, trains
from training.precision import choose_precision
from training.run import Run
from training.samples import SampleSettings, load_sample_settings
from training.validation.sets import (
    ValidationData,
    load_validation_settings,
    prepare_validation,
)

logger = logging.getLogger(__name__)


def resolve_seed(seed: int) -> int:
    """EveryDream2's ``-1`` means a random seed, chosen once and recorded."""
    if seed == -1:
        chosen = random.SystemRandom().randrange(2**31)
        logger.info("seed -1: using random seed %d", chosen)
        return chosen
    return seed


def data_settings(
    train: LoadedTrainConfig,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device_type: str = "cpu",
) -> DataSettings:
    """The dataset's settings from train.json keys of the same names."""
    c = train.config
    return DataSettings(
        data_root=find_input_file(c.data_root, train.folder, "data_root"),
        resolution=c.resolution,
        batch_size=c.batch_size,
        seed=seed,
        flip_p=c.flip_p,
        cond_dropout=c.cond_dropout,
        shuffle_tags=c.shuffle_tags,
        keep_tags=c.keep_tags,
        dataloader_num_workers=c.dataloader_num_workers,
        rank=rank,
        world_size=world_size,
        device_type=device_type,
        max_epochs=c.max_epochs,
        rated_dataset=c.rated_dataset,
        rated_dataset_target_dropout_percent=c.rated_dataset_target_dropout_percent,
    )


def resume_state_of(resume_ckpt: str) -> TrainingState | None:
    """The training state of a checkpoint of this trainer; None for plain model weights.

    A ``training_state/`` that lacks a file is an error naming what is missing.
    """
    source = weights_source(resume_ckpt)
    if source.lora_checkpoint is not None:
        return load_training_state(source.lora_checkpoint)
    if classify_resume_ckpt(resume_ckpt) is not SourceKind.LOCAL:
        return None
    path = Path(resume_ckpt).expanduser()
    if not has_training_state(path):
        logger.info("%s has no training state: a new run starts from its weights", path)
        return None
    return load_training_state(path)


def base_model_of(resume_ckpt: str, resume_state: TrainingState | None) -> str:
    """Where the run's starting weights are: what frozen models are restored from on resume.

    A resumed run keeps the base model its checkpoint names; otherwise it is ``resume_ckpt``
    (a local path made absolute, so that the reference works from any working directory).
    """
    source = weights_source(resume_ckpt)
    if source.lora_checkpoint is not None:
        return source.model
    if resume_state is not None and resume_state.frozen_weights is not None:
        return str(resume_state.frozen_weights.get("source"))
    if classify_resume_ckpt(resume_ckpt) is SourceKind.LOCAL:
        return str(Path(resume_ckpt).expanduser().absolute())
    return resume_ckpt


def sample_settings(train: LoadedTrainConfig, seed: int) -> SampleSettings | None:
    """The sample prompts file, read and checked before any model loads."""
    c = train.config
    if c.sample_prompts is None:
        return None
    path = find_input_file(c.sample_prompts, train.folder, "sample_prompts")
    return load_sample_settings(path, c.resolution, seed, batch_size=c.batch_size)


def seed_of(configured: int, resume_state: TrainingState | None) -> int:
    """The run's seed: a resumed run keeps its own; ``-1`` picks one at random."""
    if resume_state is None:
        return resolve_seed(configured)
    if configured not in (-1, resume_state.seed):
        logger.warning(
            "seed %d replaced by the resumed run's seed %d", configured, resume_state.seed
        )
    return resume_state.seed


def run_length(
    dataset: TrainDataset, config: TrainConfig, resume_state: TrainingState | None
) -> RunLength:
    """The length the LR schedule and the EMA are sized for: with the grad_accum of the run's
    start (a resumed run keeps its own: `training.length`)."""
    accum = config.grad_accum
    if resume_state is not None:
        saved = resume_state.counters.get("schedule_grad_accum")
        if isinstance(saved, int) and saved >= 1:
            accum = saved
    return RunLength.plan(dataset, config.max_epochs, accum)


def check_names(config: TrainConfig, dataset: TrainDataset) -> None:
    """Every checkpoint name the run can need fits the file system's limits (checked with the
    most optimizer steps it can take: one per batch)."""
    folder = longest_checkpoint_dir(
        config.save_ckpt_dir, config.logdir, config.project_name, config.run_name
    )
    steps = optimizer_steps(dataset, config.max_epochs, 1)
    check_output_names(config.project_name, folder, config.max_epochs, steps)


def load_trainable_models(
    train: LoadedTrainConfig,
    optim: OptimizerConfig,
    resume_state: TrainingState | None,
    device: torch.device,
    seed: int,
    weights: bool = True,
) -> tuple[ModelBundle, tuple[FreezeReport, ...], LoraSettings | None]:
    """The models, exactly as a resumed checkpoint left them, frozen as configured, with the
    run's LoRA adapters if it trains some (and their settings), on device. ``weights`` False
    (a dry run): shapes without data where the source allows it (`load_models`), left where
    they were loaded."""
    c = train.config
    assert c.resume_ckpt is not None
    source = weights_source(c.resume_ckpt)
    models = load_models(source.model, c.prediction_type, weights)
    if resume_state is not None and weights:
        restore_full_precision_weights(Path(c.resume_ckpt).expanduser(), models)
    models.vae.requires_grad_(False)
    models.unet.requires_grad_(not c.disable_unet_training)
    freezing = freeze_text_encoders(optim, models, not c.disable_textenc_training, c.clip_skip)
    with warnings.catch_warnings():  # saved adapters fit meta weights (shapes are checked)
        warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter")
        lora = add_run_adapters(train, models, freezing, source, seed)
    store_base_weights(train, models, device)
    if weights:
        for module in (models.unet, *models.text_encoders, models.vae):
            module.to(device)
    return models, freezing, lora


@dataclass(frozen=True)
class _Prepared:
    """What a run is built from before any model loads."""

    train: LoadedTrainConfig
    seed: int
    resume_state: TrainingState | None
    samples: SampleSettings | None
    plugins: list[BasePlugin]
    dataset: TrainDataset
    validation: ValidationData | None
    length: RunLength


def _prepare(
    train: LoadedTrainConfig, optim: OptimizerConfig, device: torch.device, rank: int, world: int
) -> _Prepared:
    """Everything that can be checked without the models (plugins, files, data, names)."""
    train = resolve_findlast(train)
    c = train.config
    assert c.resume_ckpt is not None
    plugins = load_plugins(c.plugins, train.folder)
    check_before_models(train, optim)
    train = with_family_resolution(train)
    c = train.config
    resume_state = resume_state_of(c.resume_ckpt)
    seed = seed_of(c.seed, resume_state)
    samples = sample_settings(train, seed)
    validation = load_validation_settings(train)
    transforms = PluginTransforms(plugins) if plugins else None
    dataset = load_dataset(data_settings(train, seed, rank, world, device.type), transforms)
    dataset, validation_data = prepare_validation(validation, dataset)  # held-out images leave
    length = run_length(dataset, c, resume_state)
    check_names(c, dataset)
    if c.latent_cache_dir is not None:
        check_cache_dir(c.latent_cache_dir)
    return _Prepared(train, seed, resume_state, samples, plugins, dataset, validation_data, length)


def _fit_budget(
    p: _Prepared,
    optim: OptimizerConfig,
    models: ModelBundle,
    device: torch.device,
    world_size: int,
    ema: EmaSettings | None,
) -> tuple[_Prepared, OptimizerConfig]:
    """``vram_budget_gb``: the savings the forecast needs (`training.planner`); a batch split
    into accumulation plans the data again."""
    c = p.train.config
    trained = [name for name in ("unet", "text_encoder") if trains(models.component(name))]
    on_device = ema is not None and ema.device == device
    ema_bytes = ema_memory(ema, models, trained)["total_bytes"] if on_device else 0
    dtype = choose_precision(device, c.mixed_precision, c.disable_amp).dtype
    bucket = max(p.dataset.buckets, key=lambda size: size[0] * size[1])
    train, optim = fit_budget(p.train, optim, models, bucket, device, world_size, ema_bytes, dtype)
    new = train.config
    if (new.batch_size, new.grad_accum) == (c.batch_size, c.grad_accum):
        return dataclasses.replace(p, train=train), optim
    settings = p.dataset.settings
    dataset = load_dataset(
        data_settings(train, p.seed, settings.rank, settings.world_size, device.type),
        p.dataset.transforms,
    )
    validation = load_validation_settings(train)
    dataset, validation_data = prepare_validation(validation, dataset)
    length = run_length(dataset, new, p.resume_state)
    return dataclasses.replace(
        p, train=train, dataset=dataset, validation=validation_data, length=length
    ), optim


def _check_placement(c: TrainConfig, world_size: int, text_encoder_trains: bool) -> None:
    """Settings that the models' training and the process count rule out."""
    if c.fused_backward_pass and world_size > 1:
        raise UserError(
            "fused_backward_pass: cannot run in several processes (each parameter would step "
            "before the processes average its gradient); launch one process or turn it off"
        )
    if c.text_encoder_offload and text_encoder_trains:
        raise UserError(
            "text_encoder_offload: the text encoder trains, so it must stay on the training "
            "device; set disable_textenc_training (or freeze all of it) or turn the offload off"
        )


def _check_fsdp(
    c: TrainConfig, optim: OptimizerConfig, models: ModelBundle, device: torch.device
) -> None:
    trained = [name for name in ("unet", "text_encoder") if trains(models.component(name))]
    scaler = choose_precision(device, c.mixed_precision, c.disable_amp).uses_grad_scaler
    check_fsdp(c, optim, trained, scaler)


def _ema_settings(p: _Prepared, device: torch.device) -> EmaSettings | None:
    resumed_ema = p.resume_state is not None and "ema" in p.resume_state.components
    return ema_settings(p.train.config, p.length.planned_steps, device, resumed_ema)


def build_run(
    train: LoadedTrainConfig,
    optim: OptimizerConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    fsdp: FsdpOptions | None = None,
    weights: bool = True,
) -> Run:
    """Check, scan the data, load the models (``weights`` False: to report), build optimizers."""
    p = _prepare(train, optim, device, rank, world_size)
    c = p.train.config
    assert c.resume_ckpt is not None
    ema = _ema_settings(p, device)
    models, freezing, lora = load_trainable_models(
        p.train, optim, p.resume_state, device, p.seed, weights
    )
    if c.vram_budget_gb is not None:
        p, optim = _fit_budget(p, optim, models, device, world_size, ema)
        c = p.train.config
        ema = _ema_settings(p, device)
    _check_placement(c, world_size, trains(models.component("text_encoder")))
    if fsdp is not None:
        _check_fsdp(c, optim, models, device)
    steps = p.length.planned_steps
    unet, text_encoder = build_trainings(models, optim, steps, c.fused_backward_pass)
    base_model = base_model_of(c.resume_ckpt, p.resume_state)
    run = Run(
        train=p.train,
        optim=optim,
        seed=p.seed,
        device=device,
        dataset=p.dataset,
        models=models,
        freezing=freezing,
        unet_training=unet,
        text_encoder_training=text_encoder,
        length=p.length,
        samples=p.samples,
        resume_state=p.resume_state,
        base_model=base_model,
        plugins=p.plugins,
        ema=ema,
        validation=p.validation,
        lora=lora_export(p.train, lora, models, base_model),
        fsdp=fsdp,
    )
    if p.resume_state is not None:
        check_fingerprint(p.resume_state, run.fingerprint(), Path(c.resume_ckpt).expanduser())
    return run


def build_trainings(
    models: ModelBundle,
    optim: OptimizerConfig,
    planned_steps: int,
    fused: bool = False,
) -> tuple[ModelTraining | None, ModelTraining | None]:
    """The UNet's and the text encoder's optimizer and LR scheduler (None: not trained);
    ``fused``: stepped in backward (``fused_backward_pass``)."""
    te2 = models.text_encoder_2
    own = optim.text_encoder_2_own()
    second = None if te2 is None else (te2, own)
    return (
        build_model_training("unet", models.unet, optim.unet, planned_steps, fused),
        build_model_training(
            "text_encoder",
            models.text_encoder,
            optim.text_encoder,
            planned_steps,
            fused,
            second,
        ),
    )


def build_from_command_line(command_line: CommandLine) -> tuple[Run, Accelerator]:
    """Load and check the configuration, then build the run, as ``train.py`` does."""
    train = load_train_config(command_line)
    optim = load_optimizer_config(train)
    accelerator, fsdp = make_accelerator()
    device = training_device(accelerator, train.config.gpuid)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    run = build_run(train, optim, device, rank, world_size, fsdp, not command_line.dry_run)
    return run, accelerator
