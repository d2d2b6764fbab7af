"""Speed and memory on CUDA: images/s, peak memory and MFU of the real trainer, per configuration.

    .venv/bin/python bench/bench_cuda.py --targets-only      # issue 5's target rows (4 runs)
    .venv/bin/python bench/bench_cuda.py                     # the whole matrix (72 runs)
    .venv/bin/python bench/bench_cuda.py --dry-run-cpu       # the same code path, tiny-sd15 on CPU

Each configuration (model and resolution, batch size, gradient checkpointing, optimizer,
cache_latents) runs in a fresh process (this script started again with ``--child``), so peak
memory never leaks from one row into the next. The child builds the run from train.py flags the
way train.py does (`build_run`) and trains it with `run_training` itself, on synthetic square
JPEGs at the benchmark resolution (one bucket; enough images that the timed steps stay inside
the first epoch). Both models are trained; the optimizer is the shipped optimizer.json with its
``optimizer`` replaced. Precision, SDPA, channels_last and fused AdamW are whatever the trainer
chooses on that GPU. After ``--warmup`` optimizer steps the next ``--steps`` are timed (CUDA
synchronised at both ends of the window); then the child stops training (no checkpoint).

- images/s = batch × timed steps / seconds; step ms = seconds / timed steps;
- peak GiB = torch.cuda.max_memory_allocated() over the whole training run (model weights,
  latent caching, optimizer state and the steps; the FLOP count before it is excluded);
- fcst GiB = the dry run's memory forecast for the row (`memory.peak_bytes`), beside the peak;
- FLOPs: one forward of the UNet, the text encoder (77 tokens) and the VAE encoder at batch 1
  and the benchmark resolution, counted by torch.utils.flop_counter.FlopCounterMode (attention
  through SDPA's math kernel so that it is counted on every device). Training FLOPs per image =
  3 × (UNet + text encoder) (forward and backward, both trained) + 1 × VAE encoder (frozen,
  forward only; 0 when latents are cached). Recomputation by gradient checkpointing is not
  counted (model FLOPs, not hardware FLOPs);
- MFU = images/s × training FLOPs per image / the GPU's peak dense bf16 FLOP/s, from a table of
  device names (H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312) or ``--peak-tflops``.

Issue 5's targets (one H100, SD1.5 at 512 px, batch 8, UNet and text encoder trained, adamw8bit)
are judged in the ``targets`` column where they apply: with cached latents at least 90 images/s
and at most 26 GiB peak; with the VAE in the step at least 45 images/s; gradient checkpointing at
most 25% slower than the same row without it. If ``cache_latents`` is requested but the trainer
did not use a latent cache, the row says ``cached: NOT ACTIVE`` and is not judged as cached.

``--results FILE`` appends each row to a JSON-lines file as soon as it is measured and reuses the
rows already there (same configuration, device, warm-up and timed steps), so the matrix can be
measured in several shorter invocations (the whole matrix takes about an hour); the table shows
every selected configuration, measured now or read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.cuda_args import FSDP_PROCESSES, VARIANT_FLAGS, fsdp_launch_flags, parse_args
from bench.cuda_matrix import CUDA_SCENARIO, DRY_SCENARIO, Config
from bench.cuda_table import print_table
from bench.cuda_window import PROFILED_STEPS, StepProfile, Window
from bench.trainer_harness import (
    build_run_from_flags,
    train_with_hook,
    write_optimizer_json,
)
from models import add_time_ids, added_cond_kwargs
from training.build import Run
from training.report import memory_report
from training.step import CaptionTokenizer, PromptEncoder

logger = logging.getLogger("bench_cuda")

RESULT_PREFIX = "BENCH_RESULT "
# (model, resolution) pairs of the matrix
CUDA_CASES = (("sd15-random", 512), ("sd21-random", 512), ("sd21-random", 768))
CUDA_BATCHES = (1, 8)
# SDXL's rows (--sdxl): 1024 px, batches 1 and 4, gradient checkpointing on, full and LoRA.
SDXL_CASES = (("sdxl-random", 1024),)
SDXL_BATCHES = (1, 4)
DRY_CASES = (("tiny-sd15", 64), ("tiny-sdxl", 64))
DRY_BATCHES = (1, 2)
CUDA_DEFAULTS = {"warmup": 6, "steps": 20, "images": 256}
DRY_DEFAULTS = {"warmup": 2, "steps": 3, "images": 0}
# --- the child: one configuration -------------------------------------------------------------


def size_conditioning_of(resolution: int, batch: int) -> torch.Tensor:
    """SDXL's time ids of square images of ``resolution`` px, uncropped."""
    size = (resolution, resolution)
    return add_time_ids([size] * batch, [(0, 0)] * batch, [size] * batch)


def count_forward_flops(run: Run) -> dict[str, int]:
    """FLOPs of one forward at batch 1 of the UNet, the text encoder and the VAE encoder."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    bundle, device = run.models, run.device
    resolution = run.train.config.resolution
    factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    ids = CaptionTokenizer.of(bundle)([""]).to(device)
    pixels = torch.zeros(1, bundle.vae.config.in_channels, resolution, resolution, device=device)
    side = resolution // factor
    latents = torch.zeros(1, bundle.unet.config.in_channels, side, side, device=device)
    timesteps = torch.tensor([500], device=device)
    flops: dict[str, int] = {}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            conditioning = PromptEncoder.of(bundle, 0)(ids)
        flops["text_encoder"] = counter.get_total_flops()
        added = None
        if conditioning.pooled is not None:  # SDXL: the pooled embedding and the time ids
            time_ids = size_conditioning_of(resolution, 1).to(device)
            added = added_cond_kwargs(conditioning.pooled, time_ids)
        with FlopCounterMode(display=False) as counter:
            bundle.unet(
                latents,
                timesteps,
                encoder_hidden_states=conditioning.embeds,
                added_cond_kwargs=added,
            )
        flops["unet"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            bundle.vae.encode(pixels)
        flops["vae_encoder"] = counter.get_total_flops()
    return flops


def child_flags(config: Config, data_root: Path, folder: Path, extra: list[str]) -> list[str]:
    return [
        "--resume_ckpt",
        config.model,
        "--data_root",
        str(data_root),
        "--resolution",
        str(config.resolution),
        "--batch_size",
        str(config.batch_size),
        "--max_epochs",
        "1000",  # the window ends the run long before
        "--optimizer_config",
        str(write_optimizer_json(folder, config.optimizer)),
        "--logdir",
        str(folder / "logs"),
        "--project_name",
        "bench",
        "--gradient_checkpointing",
        str(config.gradient_checkpointing).lower(),
        "--cache_latents",
        str(config.cache_latents).lower(),
        *VARIANT_FLAGS[config.variant],
        *extra,
    ]


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process; returns the row."""
    config = Config(**spec["config"])
    with tempfile.TemporaryDirectory(prefix="bench_cuda_") as tmp:
        flags = child_flags(config, Path(spec["data_root"]), Path(tmp), spec["trainer_flags"])
        run, accelerator = build_run_from_flags(flags)
        cuda = run.device.type == "cuda"
        flops = count_forward_flops(run)
        forecast = memory_report(run)["peak_bytes"]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        profile = None if spec["profile"] is None else StepProfile(Path(spec["profile"]), cuda)
        window = Window(spec["warmup"], spec["steps"], cuda, profile)
        try:
            train_with_hook(run, accelerator, window)
        except torch.OutOfMemoryError:
            return {"status": "OOM", "flops": flops}
        return {
            "status": "ok",
            "flops": flops,
            "seconds": window.seconds,
            "steps": spec["steps"],
            "cache_active": window.cache_active,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "forecast_bytes": forecast,
            "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        }


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    logging.basicConfig(
        level=logging.INFO if spec["verbose"] else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    row = run_child(spec)
    if int(os.environ.get("RANK", "0")) == 0:  # FSDP rows: the main process reports
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


# --- the parent: data, the matrix, the table --------------------------------------------------


def make_images(folder: Path, resolution: int, count: int) -> None:
    """Square JPEGs of smooth colour waves and noise, one bucket at ``resolution``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    base = np.stack(
        [127 + 100 * np.sin(x / (40 + 15 * c) + y / (70 - 10 * c)) for c in range(3)], axis=-1
    )
    for k in range(count):
        pixels = np.roll(base, shift=(13 * k, 7 * k), axis=(0, 1))
        pixels = pixels + rng.normal(0, 10, size=pixels.shape) + rng.uniform(-40, 40, size=3)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"a synthetic test pattern number {k}_.jpg", quality=90)


def device_name(dry_run: bool) -> str:
    """The GPU's name, asked in a short-lived process (no CUDA context stays in this one)."""
    if dry_run:
        return "CPU (dry run)"
    command = [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"]
    return subprocess.run(command, text=True, capture_output=True, check=True).stdout.strip()


def build_matrix(args: argparse.Namespace) -> list[Config]:
    cases = DRY_CASES if args.dry_run_cpu else (SDXL_CASES if args.sdxl else CUDA_CASES)
    default_batches = SDXL_BATCHES if args.sdxl else CUDA_BATCHES
    batches = args.batch_sizes or (DRY_BATCHES if args.dry_run_cpu else default_batches)
    scenario = DRY_SCENARIO if args.dry_run_cpu else CUDA_SCENARIO
    configs = [
        Config(model, resolution, batch, ckpt, optimizer, cached, variant)
        for model, resolution in cases
        if args.models is None or model in args.models
        if args.resolutions is None or resolution in args.resolutions
        for batch in batches
        for optimizer in args.optimizers
        for cached in args.cached
        for ckpt in args.ckpt
        for variant in args.variants
    ]
    if args.targets_only:
        configs = [c for c in configs if scenario.holds_for(c)]
    return configs


def launch(spec: dict[str, Any], dry_run: bool, timeout: float, verbose: bool) -> dict[str, Any]:
    """Run one configuration in a fresh process; its row (status 'failed'/'timeout' on error)."""
    env = dict(os.environ)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same code path, on the CPU
        env["OMP_NUM_THREADS"] = "1"  # a busy small machine makes more OpenMP threads stall
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    processes = FSDP_PROCESSES.get(spec["config"]["variant"])
    if processes is not None:
        command[1:1] = fsdp_launch_flags(processes)
    try:
        done = subprocess.run(
            command,
            env=env,
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE,
            stderr=None if verbose else subprocess.PIPE,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((done.stderr or "").splitlines()[-15:])
    logger.error("configuration failed (exit status %d):\n%s", done.returncode, tail)
    return {"status": "failed", "exit_status": done.returncode}


def load_results(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure_all(args: argparse.Namespace, configs: list[Config]) -> list[dict[str, Any]]:
    """Rows for every configuration: reused from --results where measured on this device."""
    device = args.device
    old = {
        (r["device"], *Config(**r["config"]).key()): r
        for r in load_results(args.results)
        if r["status"] == "ok"
        and (r.get("warmup"), r.get("steps"), r.get("trainer_flags"))
        == (args.warmup, args.steps, args.trainer_flag)
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cuda_data_") as tmp:
        folders: dict[int, Path] = {}
        for n, config in enumerate(configs, 1):
            reused = old.get((device, *config.key()))
            if reused is not None and not args.fresh:
                rows.append(reused)
                continue
            if config.resolution not in folders:
                largest = max(c.batch_size for c in configs if c.resolution == config.resolution)
                count = max(args.images, largest * (args.warmup + args.steps + PROFILED_STEPS + 1))
                folders[config.resolution] = Path(tmp) / f"data-{config.resolution}"
                make_images(folders[config.resolution], config.resolution, count)
            print(f"[{n}/{len(configs)}] {config}", file=sys.stderr, flush=True)
            spec = {
                "config": dataclasses.asdict(config),
                "data_root": str(folders[config.resolution]),
                "warmup": args.warmup,
                "steps": args.steps,
                "trainer_flags": args.trainer_flag,
                "verbose": args.verbose,
                "profile": None if args.profile is None else str(args.profile / config.name()),
            }
            row = launch(spec, args.dry_run_cpu, args.config_timeout, args.verbose)
            row |= {
                "config": dataclasses.asdict(config),
                "device": device,
                "warmup": args.warmup,
                "steps": args.steps,
                "trainer_flags": args.trainer_flag,
            }
            rows.append(row)
            if args.results is not None:
                with args.results.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(row) + "\n")
    return rows


# --- the table ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__ or "")
    if args.child is not None:
        return child_main(args.child)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run-cpu to exercise the code on the CPU", file=sys.stderr)
        return 2
    defaults = DRY_DEFAULTS if args.dry_run_cpu else CUDA_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1:
        print("--warmup and --steps must be at least 1", file=sys.stderr)
        return 2
    args.device = device_name(args.dry_run_cpu)
    configs = build_matrix(args)
    if not configs:
        print("no configuration matches the filters", file=sys.stderr)
        return 2
    rows = measure_all(args, configs)
    print_table(args, rows, DRY_SCENARIO if args.dry_run_cpu else CUDA_SCENARIO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
