"""bench_cuda.py's table: FLOPs, images/s, memory, MFU and the targets' verdicts."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bench.cuda_args import FSDP_PROCESSES
from bench.cuda_matrix import (
    GIB,
    TARGET_CACHED_IMAGES_PER_S,
    TARGET_CACHED_PEAK_GIB,
    TARGET_CKPT_SLOWDOWN,
    TARGET_VAE_IMAGES_PER_S,
    Config,
    Scenario,
    peak_tflops,
)


def training_flops(row: dict[str, Any]) -> float:
    """Training FLOPs per image: 3 × trained forwards + the frozen VAE encoder when it runs."""
    flops = row["flops"]
    vae = 0 if row["cache_active"] else flops["vae_encoder"]
    return 3 * (flops["unet"] + flops["text_encoder"]) + vae


def images_per_second(row: dict[str, Any]) -> float:
    """Every process's images (FSDP rows run several) per second."""
    processes = FSDP_PROCESSES.get(row["config"]["variant"], 1)
    return row["config"]["batch_size"] * processes * row["steps"] / row["seconds"]


def judge(row: dict[str, Any], rows: list[dict[str, Any]], scenario: Scenario) -> str:
    """The targets column: the checks that apply to this row, each with PASS/FAIL."""
    config = Config(**row["config"])
    if row["status"] != "ok":
        return "-"
    checks = []
    speed = images_per_second(row)
    if config.gradient_checkpointing:
        twin = dataclasses.replace(config, gradient_checkpointing=False)
        other = [r for r in rows if r["status"] == "ok" and Config(**r["config"]) == twin]
        if other:
            slowdown = row["seconds"] / row["steps"] / (other[0]["seconds"] / other[0]["steps"])
            verdict = "PASS" if slowdown - 1 <= TARGET_CKPT_SLOWDOWN else "FAIL"
            mark = f" {verdict}" if scenario.holds_for(config) else ""
            checks.append(f"ckpt {slowdown - 1:+.0%}{mark}")
    if not scenario.holds_for(config) or config.gradient_checkpointing:
        return ", ".join(checks) or "-"
    if row["cache_active"]:
        verdict = "PASS" if speed >= TARGET_CACHED_IMAGES_PER_S else "FAIL"
        checks.append(f">={TARGET_CACHED_IMAGES_PER_S:g} img/s {verdict}")
        if row["peak_bytes"] is not None:
            verdict = "PASS" if row["peak_bytes"] / GIB <= TARGET_CACHED_PEAK_GIB else "FAIL"
            checks.append(f"<={TARGET_CACHED_PEAK_GIB:g} GiB {verdict}")
    elif not config.cache_latents:
        verdict = "PASS" if speed >= TARGET_VAE_IMAGES_PER_S else "FAIL"
        checks.append(f">={TARGET_VAE_IMAGES_PER_S:g} img/s (VAE) {verdict}")
    return ", ".join(checks)


def cached_label(row: dict[str, Any]) -> str:
    if not row["config"]["cache_latents"]:
        return "no"
    if row["status"] != "ok":
        return "yes"
    return "yes" if row["cache_active"] else "NOT ACTIVE"


def print_flops(rows: list[dict[str, Any]]) -> None:
    """Forward GFLOP per image of each (model, resolution)."""
    print(
        f"{'model':<12} {'res':>4} {'UNet':>8} {'text enc':>8} {'VAE enc':>8} "
        f"{'train/img':>9} {'cached':>8}"
    )
    seen = set()
    for row in rows:
        config = Config(**row["config"])
        if "flops" not in row or (config.model, config.resolution) in seen:
            continue
        seen.add((config.model, config.resolution))
        f = {k: v / 1e9 for k, v in row["flops"].items()}
        trained = 3 * (f["unet"] + f["text_encoder"])
        print(
            f"{config.model:<12} {config.resolution:>4} {f['unet']:>8.4g} "
            f"{f['text_encoder']:>8.4g} {f['vae_encoder']:>8.4g} "
            f"{trained + f['vae_encoder']:>9.4g} {trained:>8.4g}"
        )


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]], scenario: Scenario) -> None:
    device = args.device
    peak = peak_tflops(device, args.peak_tflops)
    peak_text = "unknown (give --peak-tflops): MFU n/a" if peak is None else f"{peak:g} TFLOP/s"
    print(
        f"device: {device}; peak dense bf16: {peak_text}; warm-up {args.warmup} steps, "
        f"{args.steps} timed steps inside the first epoch; one fresh process per row; both "
        f"models trained"
    )
    print(
        "forward GFLOP per image (FlopCounterMode, batch 1, 77 tokens, SDPA math kernel); "
        "training = 3 x (UNet + text encoder) + 1 x VAE encoder (0 when cached); "
        "checkpointing recompute not counted"
    )
    print_flops(rows)
    print()
    print(
        f"{'model':<12} {'res':>4} {'batch':>5} {'ckpt':>4} {'optimizer':<9} {'variant':<7} "
        f"{'cached':<10} {'images/s':>8} {'step ms':>8} {'peak GiB':>8} {'fcst GiB':>8} "
        f"{'MFU%':>5}  "
        f"targets"
    )
    for row in rows:
        config = Config(**row["config"])
        head = (
            f"{config.model:<12} {config.resolution:>4} {config.batch_size:>5} "
            f"{'on' if config.gradient_checkpointing else 'off':>4} {config.optimizer:<9} "
            f"{config.variant:<7} "
            f"{cached_label(row):<10}"
        )
        if row["status"] != "ok":
            print(f"{head} {row['status']:>8}")
            continue
        speed = images_per_second(row)
        peak_gib = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / GIB:.1f}"
        forecast_gib = f"{row['forecast_bytes'] / GIB:.1f}"
        mfu = "n/a" if peak is None else f"{speed * training_flops(row) / (peak * 1e12):.1%}"
        print(
            f"{head} {speed:>8.1f} {1000 * row['seconds'] / row['steps']:>8.1f} "
            f"{peak_gib:>8} {forecast_gib:>8} {mfu.rstrip('%'):>5}  {judge(row, rows, scenario)}"
        )
    if args.dry_run_cpu:
        print(
            "dry run on the CPU: the code path is exercised; the figures and verdicts mean "
            "nothing (the targets are for SD1.5 at 512 px on one H100)"
        )
    elif "H100" not in device.upper():
        print(f"note: the targets are for one H100; this device is {device}")
