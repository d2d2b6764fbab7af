"""A training session: prepare the built run's models, outputs and trainer, then train."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from training.build import Run
from training.interrupt import stop_on_signals
from training.latent_cache import build_latent_cache
from training.loop import LoopSettings, Trainer
from training.noise import make_noise_scheduler
from training.outputs import Progress, create_run_folder, write_json
from training.precision import choose_precision
from training.report import dry_run_report, memory_report
from training.step import CaptionTokenizer, PromptEncoder, Shard, StepModels, StepSettings

logger = logging.getLogger(__name__)


def step_settings(run: Run) -> StepSettings:
    c = run.train.config
    return StepSettings(
        zero_frequency_noise_ratio=c.zero_frequency_noise_ratio,
        pyramid_noise_discount=c.pyramid_noise_discount,
        timestep_start=c.timestep_start,
        timestep_end=c.timestep_end,
        loss_type=c.loss_type,
        min_snr_gamma=c.min_snr_gamma,
        embedding_perturbation=c.embedding_perturbation,
    )


def loop_settings(run: Run) -> LoopSettings:
    c = run.train.config
    return LoopSettings(
        max_epochs=c.max_epochs,
        grad_accum=c.grad_accum,
        clip_grad_norm=c.clip_grad_norm,
        log_step=c.log_step,
        sample_steps=c.sample_steps,
        save_every_n_epochs=c.save_every_n_epochs,
        ckpt_every_n_minutes=c.ckpt_every_n_minutes,
        save_ckpts_from_n_epochs=c.save_ckpts_from_n_epochs,
        save_optimizer=c.save_optimizer,
        save_full_precision=c.save_full_precision,
        no_prepend_last=c.no_prepend_last,
        no_save_ckpt=c.no_save_ckpt,
        project_name=c.project_name,
        clip_skip=c.clip_skip,
        apply_grad_scaler_step_tweaks=run.optim.apply_grad_scaler_step_tweaks,
        log_grad_norm=run.optim.log_grad_norm,
    )


def prepare_models(run: Run, accelerator: Accelerator) -> StepModels:
    """Train/eval modes, memory and speed options, DDP wrapping where several processes run."""
    c = run.train.config
    bundle = run.models
    train_unet = run.unet is not None
    train_text_encoder = run.text_encoder is not None
    bundle.vae.eval()
    bundle.unet.train(train_unet)
    bundle.text_encoder.train(train_text_encoder)
    if c.gradient_checkpointing:
        if train_unet:
            bundle.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            bundle.text_encoder.gradient_checkpointing_enable()
    if c.attn_type == "slice":
        bundle.unet.set_attention_slice("auto")
    if run.device.type == "cuda":
        bundle.unet.to(memory_format=torch.channels_last)
    unet: torch.nn.Module = bundle.unet
    if c.compile_unet:
        logger.info("compiling the UNet with torch.compile (the first steps are slow)")
        unet = torch.compile(unet)
    prompt_encoder: torch.nn.Module = PromptEncoder(bundle.text_encoder, c.clip_skip)
    if accelerator.num_processes > 1:
        if train_unet:
            unet = accelerator.prepare_model(unet, device_placement=False)
        if train_text_encoder:
            prompt_encoder = accelerator.prepare_model(prompt_encoder, device_placement=False)
    return StepModels(
        bundle=bundle,
        unet=unet,
        prompt_encoder=prompt_encoder,
        noise_scheduler=make_noise_scheduler(bundle.noise_scheduler, c.enable_zero_terminal_snr),
        train_text_encoder=train_text_encoder,
        tokens=CaptionTokenizer(bundle.tokenizer),
    )


def log_summary(run: Run, precision_name: str, world_size: int) -> None:
    """The start-up summary: model, data, batch, steps, optimizers, trainable parameters."""
    c = run.train.config
    data = run.dataset.summary()
    logger.info("model: %s (%s prediction)", c.resume_ckpt, run.models.prediction_type)
    logger.info(
        "data: %d images, %d skipped, buckets %s",
        data["images"], len(data["skipped"]), data["buckets"],
    )  # fmt: skip
    logger.info(
        "batch: %d per process x %d process(es) x %d accumulation = %d images per optimizer step",
        c.batch_size, world_size, c.grad_accum, c.batch_size * world_size * c.grad_accum,
    )  # fmt: skip
    logger.info(
        "steps: %d epochs x %d optimizer steps = %d; precision %s on %s",
        c.max_epochs, run.total_optimizer_steps // c.max_epochs, run.total_optimizer_steps,
        precision_name, run.device,
    )  # fmt: skip
    memory = memory_report(run)
    logger.info(
        "memory for weights, gradients and optimizer state: %.2f GiB (unet %.2f, text encoder "
        "%.2f, vae %.2f), activations not counted",
        memory["total_gib"], memory["unet"]["total_gib"], memory["text_encoder"]["total_gib"],
        memory["vae"]["total_gib"],
    )  # fmt: skip
    for name, training in (("unet", run.unet), ("text_encoder", run.text_encoder)):
        if training is None:
            logger.info("%s: not trained", name)
            continue
        logger.info(
            "%s: %s lr %g (%s schedule, warm-up %d, decay %d), %s trainable parameters",
            name, training.settings.name, training.settings.value("lr"),
            training.settings.value("lr_scheduler"), training.length.warmup_steps,
            training.length.decay_steps, f"{training.trainable_parameters:,}",
        )  # fmt: skip


def run_training(
    run: Run,
    accelerator: Accelerator,
    on_optimizer_step: Callable[[Trainer], None] | None = None,
) -> bool:
    """Train the built run to the end (or until Ctrl-C/SIGTERM); True when interrupted.

    ``on_optimizer_step(trainer)`` runs after every optimizer step (benchmarks time with it).
    """
    c = run.train.config
    main = accelerator.is_main_process
    torch.manual_seed(run.seed)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = choose_precision(run.device, c.disable_amp)
    models = prepare_models(run, accelerator)
    folder = create_run_folder(c.logdir, c.project_name, c.run_name) if main else None
    if folder is not None:
        write_json(folder / "config.json", dry_run_report(run))
        logger.info("run folder: %s", folder)
        log_summary(run, precision.describe(), accelerator.num_processes)
    latent_cache = (
        build_latent_cache(run.dataset, run.models, precision, run.device)
        if c.cache_latents
        else None
    )
    checkpoint_dir = Path(c.save_ckpt_dir) if c.save_ckpt_dir is not None else folder
    initial_step = 0 if run.resume_state is None else run.resume_state.global_step
    trainer = Trainer(
        dataset=run.dataset,
        models=models,
        trainings=run.trainings,
        step_settings=step_settings(run),
        settings=loop_settings(run),
        precision=precision,
        device=run.device,
        shard=Shard(accelerator.process_index, accelerator.num_processes),
        seed=run.seed,
        checkpoint_dir=checkpoint_dir if checkpoint_dir is not None else Path(c.logdir),
        progress=Progress(run.total_optimizer_steps, initial_step, c.log_step, folder),
        samples=run.samples,
        sample_dir=None if folder is None else folder / "samples",
        is_main_process=main,
        fingerprint=run.fingerprint(),
        barrier=accelerator.wait_for_everyone,
        schedule_dir=folder if c.write_schedule else None,
        latent_source=latent_cache,
        on_optimizer_step=on_optimizer_step,
    )
    if run.resume_state is not None:
        trainer.restore(run.resume_state)
    with stop_on_signals() as stop:
        interrupted = trainer.train(stop)
    if main and trainer.last_checkpoint is not None:
        logger.info("%s: %s", "interrupted" if interrupted else "done", trainer.last_checkpoint)
    return interrupted
