"""The dry run's JSON description of a built run (docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lora.adapters import adapter_parameters
from lora.kohya import KohyaNaming
from lora.report import lora_report
from models import ModelBundle
from optimizer.build import ModelTraining
from optimizer.config import ModelOptimizer
from optimizer.memory import model_memory
from training.activations import step_activations
from training.build import Run
from training.checkpointing.lora_writer import adapted_models
from training.ema import ema_memory
from training.precision import choose_precision

REPORTED_KEYS = ("optimizer", "lr", "betas", "epsilon", "weight_decay", "lr_scheduler")


def jsonable(value: Any) -> Any:
    """Strict JSON for values such as infinity (written as the string "inf") and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def model_report(training: ModelTraining) -> dict[str, Any]:
    """One model's optimizer, as resolved and as built."""
    settings: ModelOptimizer = training.settings
    out: dict[str, Any] = {key: settings.value(key) for key in REPORTED_KEYS}
    out |= {
        "class": type(training.optimizer).__name__,
        "lr_warmup_steps": training.length.warmup_steps,
        "lr_decay_steps": training.length.decay_steps,
        "params": training.kwargs,
        "unused": {key: settings.value(key) for key in settings.unused_keys()},
        "trainable_parameters": training.trainable_parameters,
    }
    groups = training.optimizer.param_groups
    if len(groups) > 1:  # SDXL's text encoders: each encoder's group, as the optimizer holds it
        out["param_groups"] = [
            {k: v for k, v in group.items() if k != "params"}
            | {"trainable_parameters": sum(p.numel() for p in group["params"])}
            for group in groups
        ]
    return jsonable(out)


def memory_report(run: Run) -> dict[str, Any]:
    """Expected bytes of weights, gradients and optimizer state of each model."""
    out: dict[str, Any] = {}
    for name, training in run.trainings_by_model().items():
        model = run.models.component(name)
        if training is None:
            out[name] = model_memory(model, None)
        else:
            slice_p = training.settings.value("slice_p")
            fused = run.train.config.fused_backward_pass
            out[name] = model_memory(model, training.settings.name, slice_p, fused)
    out["vae"] = model_memory(run.models.vae, None)
    offloaded = "text_encoder" if run.train.config.text_encoder_offload else None
    total = sum(part["total_bytes"] for name, part in out.items() if name != offloaded)
    if offloaded is not None:  # in CPU memory while training (text_encoder_offload)
        out[offloaded]["counted_in_total"] = False
    if run.ema is not None:  # counted in the total when it lives on the training device
        out["ema"] = ema_memory(run.ema, run.models, [t.model_name for t in run.trainings])
        out["ema"]["counted_in_total"] = run.ema.device == run.device
        total += out["ema"]["total_bytes"] if out["ema"]["counted_in_total"] else 0
    out["total_bytes"] = total
    out["total_gib"] = round(total / 2**30, 3)
    out["activations"] = activation_report(run)
    peak = total + out["activations"]["total_bytes"]
    out["peak_bytes"] = peak
    out["peak_gib"] = round(peak / 2**30, 3)
    out["not_counted"] = "the framework's own memory (CUDA context, kernels, allocator caches)"
    return out


def activation_report(run: Run) -> dict[str, Any]:
    """Activations of the largest bucket's batch, measured on fake tensors
    (`training.activations`)."""
    c = run.train.config
    bucket = max(run.dataset.buckets, key=lambda size: size[0] * size[1])
    trains = run.trainings_by_model()
    anything = any(t is not None for t in trains.values())
    precision = choose_precision(run.device, c.mixed_precision, c.disable_amp)
    parts = step_activations(
        run.models.unet if anything else None,
        run.models.text_encoders if trains["text_encoder"] is not None else (),
        c.batch_size,
        bucket,
        c.gradient_checkpointing,
        precision.dtype,
        run.device,
    )
    out: dict[str, Any] = {
        "batch_size": c.batch_size,
        "bucket": list(bucket),
        "gradient_checkpointing": c.gradient_checkpointing,
        "autocast": precision.describe(),
    }
    for name, part in parts.items():
        out[name] = {"saved_bytes": part.saved_bytes, "recompute_bytes": part.recompute_bytes}
    out["total_bytes"] = sum(part.total_bytes for part in parts.values())
    return out


def parameter_counts(bundle: ModelBundle) -> dict[str, int]:
    """Each model's own parameters (trained or not; LoRA adapters, counted in the ``lora``
    section, left out), SDXL's two text encoders apart."""
    models = bundle.named_models() | {"vae": bundle.vae}
    return {
        name: sum(p.numel() for p in model.parameters())
        - sum(p.numel() for p in adapter_parameters(model).values())
        for name, model in models.items()
    }


def dry_run_report(run: Run) -> dict[str, Any]:
    """Everything the run was built with, as one JSON-ready object."""
    c = run.train.config
    sources = {f"train.{k}": v for k, v in run.train.sources.items()}
    sources |= run.optim.sources()
    return {
        **{
            name: None if training is None else model_report(training)
            for name, training in run.trainings_by_model().items()
        },
        **{
            f"text_encoder{'' if i == 0 else f'_{i + 1}'}_freezing": report.as_dict()
            for i, report in enumerate(run.freezing)
        },
        "sources": sources,
        "data": run.dataset.summary(),
        "validation": None if run.validation is None else run.validation.describe(),
        "memory": memory_report(run),
        "model": {
            "resume_ckpt": c.resume_ckpt,
            "family": run.models.family,
            "parameters": parameter_counts(run.models),
            "prediction_type": run.models.prediction_type,
            "text_encoder_layers": run.freezing[0].plan.num_layers,
            **(
                {"text_encoder_2_layers": run.freezing[1].plan.num_layers}
                if len(run.freezing) > 1
                else {}
            ),
        },
        "run": {
            "device": str(run.device),
            "seed": run.seed,
            "max_epochs": c.max_epochs,
            "batch_size": c.batch_size,
            "grad_accum": c.grad_accum,
            "total_optimizer_steps": run.length.planned_steps,
            "apply_grad_scaler_step_tweaks": run.optim.apply_grad_scaler_step_tweaks,
            "log_grad_norm": run.optim.log_grad_norm,
        },
        "train": jsonable(dataclasses.asdict(c)),
        "optimizer_config": None if run.optim.path is None else str(run.optim.path),
        "ema": None if run.ema is None else run.ema.describe(),
        "lora": lora_section(run),
    }


def lora_section(run: Run) -> dict[str, Any] | None:
    """A LoRA run's adapters: settings, modules, tensors and parameters per model, the kohya
    file's size (None: a full fine-tune)."""
    if run.lora is None:
        return None
    full_precision = run.train.config.save_full_precision
    naming = KohyaNaming.of(run.models.unet)
    report = lora_report(adapted_models(run.models), full_precision, naming)
    return jsonable({**run.lora.as_dict(), "merge": run.lora.merge, **report})
