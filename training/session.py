"""A training session: prepare the built run's models, outputs and components, then train."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.contrib.logging import logging_redirect_tqdm

from config.errors import UserError
from training.checkpointing.names import checkpoint_dir
from training.components import Component
from training.components.build import build_components
from training.disk_cache import latent_cache_for
from training.environment import Environment
from training.fsdp import Sharding
from training.interrupt import stop_on_signals
from training.logfile import FILE_ONLY, log_file
from training.loop import StopTraining, Trainer, TrainingDivergedError
from training.metrics import Metrics, Sink, TensorBoardSink, WandbSink
from training.noise import make_noise_scheduler
from training.outputs import create_run_folder, write_json
from training.precision import Precision, choose_precision
from training.report import dry_run_report, memory_report
from training.run import Run
from training.sources import BatchSource, MaskedSource, PixelSource
from training.step import CaptionTokenizer, PromptEncoder, Shard, StepModels
from training.text_cache import CachedPromptEncoder, offload_text_encoders

logger = logging.getLogger(__name__)


class TrainingCrashedError(RuntimeError):
    """An unexpected error during training; the message is one line, the traceback is logged."""


def prepare_models(run: Run, accelerator: Accelerator) -> StepModels:
    """Train/eval modes, memory and speed options, DDP wrapping where several processes run."""
    c = run.train.config
    bundle = run.models
    train_unet = run.unet_training is not None
    train_text_encoder = run.text_encoder_training is not None
    bundle.vae.eval()
    bundle.unet.train(train_unet)
    for text_encoder in bundle.text_encoders:
        text_encoder.train(train_text_encoder)
    if c.gradient_checkpointing:
        # A frozen UNet still backpropagates to a trained text encoder: checkpoint it too.
        bundle.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            for text_encoder in bundle.text_encoders:
                text_encoder.gradient_checkpointing_enable()
    if c.attn_type == "slice":
        bundle.unet.set_attention_slice("auto")
    if uses_channels_last(run.device, run.fsdp is not None):
        bundle.unet.to(memory_format=torch.channels_last)
    # Saved checkpoints and samples use the schedule the model trains with.
    bundle.noise_scheduler = make_noise_scheduler(
        bundle.noise_scheduler, c.enable_zero_terminal_snr
    )
    unet: torch.nn.Module = bundle.unet
    if c.compile_unet:
        logger.info("compiling the UNet with torch.compile (the first steps are slow)")
        unet = torch.compile(unet)
    prompt_encoder: torch.nn.Module = PromptEncoder.of(bundle, c.clip_skip)
    if not train_text_encoder and not c.shuffle_tags:
        prompt_encoder = CachedPromptEncoder(prompt_encoder)  # frozen: each caption once
        if c.text_encoder_offload:
            offload_text_encoders(bundle.text_encoders)

    if accelerator.num_processes > 1 and run.fsdp is None:
        if train_unet:
            unet = accelerator.prepare_model(unet, device_placement=False)
        if train_text_encoder:
            prompt_encoder = accelerator.prepare_model(prompt_encoder, device_placement=False)
    return StepModels(
        bundle=bundle,
        unet=unet,
        prompt_encoder=prompt_encoder,
        noise_scheduler=bundle.noise_scheduler,
        train_text_encoder=train_text_encoder,
        tokens=CaptionTokenizer.of(bundle),
    )


def uses_channels_last(device: torch.device, sharded: bool) -> bool:
    """The UNet's convolutions in channels-last memory on CUDA (faster), except under FSDP2,
    which shards only contiguous parameters."""
    return device.type == "cuda" and not sharded


def shard_models(run: Run, accelerator: Accelerator) -> Sharding | None:
    """Under FSDP, the trained models sharded in place over the process group (one GPU
    included: that process holds every shard); None otherwise."""
    if run.fsdp is None:
        return None
    if not torch.distributed.is_initialized():  # one process on a CPU: no process group
        logger.info("FSDP without a process group: nothing to shard, the models stay whole")
        return None
    sharding = Sharding(run.models, run.trainings)
    sharding.shard(run.device, run.fsdp)
    return sharding


def log_summary(run: Run, precision_name: str, world_size: int) -> None:
    """The start-up summary: model, data, batch, steps, memory, optimizers."""
    c = run.train.config
    data = run.dataset.summary()
    logger.info("model: %s (%s prediction)", c.resume_ckpt, run.models.prediction_type)
    logger.info(
        "data: %d images, %d skipped, buckets %s",
        data["images"],
        len(data["skipped"]),
        data["buckets"],
    )
    logger.info(
        "batch: %d per process x %d process(es) x %d accumulation = %d images per optimizer step",
        c.batch_size,
        world_size,
        c.grad_accum,
        c.batch_size * world_size * c.grad_accum,
    )
    logger.info(
        "steps: %d optimizer steps in %d epochs; precision %s on %s",
        run.length.planned_steps,
        c.max_epochs,
        precision_name,
        run.device,
    )
    log_memory(run)
    log_optimizers(run)


def log_memory(run: Run) -> None:
    """Expected memory for weights, gradients, optimizer state, activations and the EMA."""
    memory = memory_report(run)
    logger.info(
        "memory forecast: %.2f GiB at the peak: weights, gradients and optimizer state %.2f GiB "
        "(unet %.2f, text encoder %.2f, vae %.2f), activations %.2f GiB",
        memory["peak_gib"],
        memory["total_gib"],
        memory["unet"]["total_gib"],
        memory["text_encoder"]["total_gib"],
        memory["vae"]["total_gib"],
        memory["activations"]["total_bytes"] / 2**30,
    )
    if run.fsdp is not None:
        logger.info(
            "FSDP: the forecast is of one unsharded process; each of the %d processes keeps "
            "1/%d of the trained models' weights, gradients and optimizer state",
            run.dataset.settings.world_size,
            run.dataset.settings.world_size,
        )
    if "ema" in memory:
        ema = memory["ema"]
        logger.info(
            "EMA copy of the trained weights: %.2f GiB in %s memory%s",
            ema["total_gib"],
            ema["device"],
            "" if ema["counted_in_total"] else " (not in the total above)",
        )


def log_optimizers(run: Run) -> None:
    """Each model's optimizer, schedule and trainable parameters (or that it does not train)."""
    for name, training in run.trainings_by_model().items():
        if training is None:
            logger.info("%s: not trained", name)
            continue
        logger.info(
            "%s: %s lr %g (%s schedule, warm-up %d, decay %d), %s trainable parameters",
            name,
            training.settings.name,
            training.settings.value("lr"),
            training.settings.value("lr_scheduler"),
            training.length.warmup_steps,
            training.length.decay_steps,
            f"{training.trainable_parameters:,}",
        )


def make_metrics(run: Run, folder: Path, report: dict[str, Any]) -> Metrics:
    """TensorBoard in the run folder, plus Weights & Biases with ``wandb: true`` (``report``,
    the resolved configuration, is the W&B run's config)."""
    c = run.train.config
    sinks: list[Sink] = [TensorBoardSink(folder)]
    if c.wandb:
        sinks.append(WandbSink(folder, c.project_name, c.run_name, report))
    return Metrics(sinks)


def batch_source(run: Run, precision: Precision) -> BatchSource:
    """Images through the loader and the VAE in the step, or a latent cache built now; with
    ``masked_loss``, each image's mask too."""
    source: BatchSource
    if run.train.config.cache_latents:
        cache_dir = run.train.config.latent_cache_dir
        source = latent_cache_for(run.dataset, run.models, precision, run.device, cache_dir)
    else:
        source = PixelSource(run.dataset, run.models, precision, run.device)
    return MaskedSource(source) if run.train.config.masked_loss else source


def _check_fused(fused: bool, precision: Precision) -> None:
    if fused and precision.uses_grad_scaler:
        raise UserError(
            "fused_backward_pass: this GPU trains in fp16 (mixed_precision auto), whose grad "
            "scaler needs every gradient before any step; set mixed_precision no, or turn "
            "fused_backward_pass off"
        )


def run_training(
    run: Run, accelerator: Accelerator, extra_components: Sequence[Component] = ()
) -> str:
    """Train the built run to the end (or until Ctrl-C/SIGTERM): "finished" or "interrupted".

    ``extra_components`` run after the run's own (benchmarks time steps with one). An
    unexpected error becomes a `TrainingCrashedError` whose traceback is in the log file.
    """
    c = run.train.config
    main = accelerator.is_main_process
    torch.manual_seed(run.seed)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = choose_precision(run.device, c.mixed_precision, c.disable_amp)
    _check_fused(c.fused_backward_pass, precision)
    models = prepare_models(run, accelerator)
    folder = create_run_folder(c.logdir, c.project_name, c.run_name) if main else None
    with ExitStack() as stack:
        log_path = stack.enter_context(log_file(folder))
        metrics = None
        if folder is not None:
            report = dry_run_report(run)
            write_json(folder / "config.json", report)
            logger.info("run folder: %s", folder)
            log_summary(run, precision.describe(), accelerator.num_processes)
            metrics = make_metrics(run, folder, report)
            stack.callback(metrics.close)
        # after the report: its activation forecast runs the models on fake tensors
        sharding = shard_models(run, accelerator)
        run_folder = folder if folder is not None else Path(c.logdir)  # not written elsewhere
        env = Environment(
            device=run.device,
            shard=Shard(accelerator.process_index, accelerator.num_processes),
            precision=precision,
            source=batch_source(run, precision),
            is_main_process=main,
            run_id="" if folder is None else f"{folder.name}.{uuid.uuid4().hex[:12]}",
            run_folder=folder,
            checkpoint_dir=checkpoint_dir(c.save_ckpt_dir, run_folder),
            metrics=metrics,
            barrier=accelerator.wait_for_everyone,
            sharding=sharding,
        )
        trainer = Trainer(run, models, env, build_components(run, extra_components))
        if run.resume_state is not None:
            trainer.restore(run.resume_state)
            run.resume_state = None  # its tensors (optimizer and EMA states) are copied now
        return _train(trainer, log_path)


def _train(trainer: Trainer, log_path: Path | None) -> str:
    """The trainer's loop under the signal handlers, with crashes made one line."""
    try:
        with logging_redirect_tqdm(), stop_on_signals() as stop:
            outcome = trainer.train(stop)
    except (UserError, TrainingDivergedError, StopTraining, KeyboardInterrupt):
        raise
    except Exception as error:
        if log_path is None:  # another process than the main one: no log file
            logger.exception("traceback of the crash")
        else:
            logger.error("traceback of the crash", exc_info=True, extra=FILE_ONLY)
        where = "" if log_path is None else f"; the traceback is in {log_path}"
        raise TrainingCrashedError(
            f"training crashed: {type(error).__name__}: {error}{where}"
        ) from error
    last = trainer.state.last_checkpoint
    if trainer.env.is_main_process and last is not None:
        logger.info("%s: %s", outcome, last)
    return outcome
