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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.trainer_harness import (
    BenchmarkFinished,
    build_run_from_flags,
    train_with_hook,
    write_optimizer_json,
)
from models import tokenize
from training.build import Run
from training.context import TrainingContext
from training.latent_cache import LatentCache

logger = logging.getLogger("bench_cuda")

GIB = 2**30
RESULT_PREFIX = "BENCH_RESULT "
OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit")
# (model, resolution) pairs of the matrix
CUDA_CASES = (("sd15-random", 512), ("sd21-random", 512), ("sd21-random", 768))
CUDA_BATCHES = (1, 8)
DRY_CASES = (("tiny-sd15", 64),)
DRY_BATCHES = (1, 2)
CUDA_DEFAULTS = {"warmup": 6, "steps": 20, "images": 256}
DRY_DEFAULTS = {"warmup": 2, "steps": 3, "images": 0}
# Peak dense bf16 tensor FLOP/s by the words of a device name; the first match wins; None:
# unknown (NVL parts run at lower clocks), so MFU needs --peak-tflops.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("NVL",), None),
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "HBM3"), 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("H100", "SXM"), 989.0),
    (("A100",), 312.0),
)
# Issue 5's targets for one H100.
TARGET_CACHED_IMAGES_PER_S = 90.0
TARGET_CACHED_PEAK_GIB = 26.0
TARGET_VAE_IMAGES_PER_S = 45.0
TARGET_CKPT_SLOWDOWN = 0.25
TARGET_OPTIMIZER = "adamw8bit"


@dataclass(frozen=True)
class Config:
    """One row of the matrix."""

    model: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    optimizer: str
    cache_latents: bool

    def key(self) -> tuple[Any, ...]:
        return dataclasses.astuple(self)


@dataclass(frozen=True)
class Scenario:
    """Where issue 5's targets apply: model, resolution and batch size."""

    model: str
    resolution: int
    batch_size: int

    def holds_for(self, config: Config) -> bool:
        return (config.model, config.resolution, config.batch_size, config.optimizer) == (
            self.model,
            self.resolution,
            self.batch_size,
            TARGET_OPTIMIZER,
        )


CUDA_SCENARIO = Scenario("sd15-random", 512, 8)
DRY_SCENARIO = Scenario("tiny-sd15", 64, 2)  # stands in for it, to exercise the judging code


# --- the child: one configuration -------------------------------------------------------------


def count_forward_flops(run: Run) -> dict[str, int]:
    """FLOPs of one forward at batch 1 of the UNet, the text encoder and the VAE encoder."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    bundle, device = run.models, run.device
    resolution = run.train.config.resolution
    factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    ids = tokenize(bundle.tokenizer, [""]).to(device)
    pixels = torch.zeros(1, bundle.vae.config.in_channels, resolution, resolution, device=device)
    side = resolution // factor
    latents = torch.zeros(1, bundle.unet.config.in_channels, side, side, device=device)
    timesteps = torch.tensor([500], device=device)
    flops: dict[str, int] = {}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            embeddings = bundle.text_encoder(ids).last_hidden_state
        flops["text_encoder"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            bundle.unet(latents, timesteps, encoder_hidden_states=embeddings)
        flops["unet"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            bundle.vae.encode(pixels)
        flops["vae_encoder"] = counter.get_total_flops()
    return flops


@dataclass
class Window:
    """The step hook: time optimizer steps warmup+1 .. warmup+steps, then stop training."""

    warmup: int
    steps: int
    cuda: bool
    count: int = 0
    started: float = 0.0
    seconds: float = 0.0
    cache_active: bool = False

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, ctx: TrainingContext) -> None:
        self.count += 1
        if self.count == 1:
            self.cache_active = isinstance(ctx.env.source, LatentCache)
        if self.count == self.warmup:
            self.started = self._now()
        elif self.count == self.warmup + self.steps:
            self.seconds = self._now() - self.started
            raise BenchmarkFinished


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
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        window = Window(spec["warmup"], spec["steps"], cuda)
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
            "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        }


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    logging.basicConfig(
        level=logging.INFO if spec["verbose"] else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    row = run_child(spec)
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


def peak_tflops(name: str, given: float | None) -> float | None:
    """The GPU's dense bf16 peak: ``given``, else from `PEAK_TFLOPS`, else None (MFU n/a)."""
    if given is not None:
        return given
    upper = name.upper()
    for words, tflops in PEAK_TFLOPS:
        if all(word in upper for word in words):
            return tflops
    return None


def build_matrix(args: argparse.Namespace) -> list[Config]:
    cases = DRY_CASES if args.dry_run_cpu else CUDA_CASES
    batches = args.batch_sizes or (DRY_BATCHES if args.dry_run_cpu else CUDA_BATCHES)
    scenario = DRY_SCENARIO if args.dry_run_cpu else CUDA_SCENARIO
    configs = [
        Config(model, resolution, batch, ckpt, optimizer, cached)
        for model, resolution in cases
        if args.models is None or model in args.models
        if args.resolutions is None or resolution in args.resolutions
        for batch in batches
        for optimizer in args.optimizers
        for cached in args.cached
        for ckpt in args.ckpt
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
                count = max(args.images, largest * (args.warmup + args.steps + 1))
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


def training_flops(row: dict[str, Any]) -> float:
    """Training FLOPs per image: 3 × trained forwards + the frozen VAE encoder when it runs."""
    flops = row["flops"]
    vae = 0 if row["cache_active"] else flops["vae_encoder"]
    return 3 * (flops["unet"] + flops["text_encoder"]) + vae


def images_per_second(row: dict[str, Any]) -> float:
    return row["config"]["batch_size"] * row["steps"] / row["seconds"]


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
    print()
    print(
        f"{'model':<12} {'res':>4} {'batch':>5} {'ckpt':>4} {'optimizer':<9} "
        f"{'cached':<10} {'images/s':>8} {'step ms':>8} {'peak GiB':>8} {'MFU%':>5}  "
        f"targets"
    )
    for row in rows:
        config = Config(**row["config"])
        head = (
            f"{config.model:<12} {config.resolution:>4} {config.batch_size:>5} "
            f"{'on' if config.gradient_checkpointing else 'off':>4} {config.optimizer:<9} "
            f"{cached_label(row):<10}"
        )
        if row["status"] != "ok":
            print(f"{head} {row['status']:>8}")
            continue
        speed = images_per_second(row)
        peak_gib = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / GIB:.1f}"
        mfu = "n/a" if peak is None else f"{speed * training_flops(row) / (peak * 1e12):.1%}"
        print(
            f"{head} {speed:>8.1f} {1000 * row['seconds'] / row['steps']:>8.1f} "
            f"{peak_gib:>8} {mfu.rstrip('%'):>5}  {judge(row, rows, scenario)}"
        )
    if args.dry_run_cpu:
        print(
            "dry run on the CPU: the code path is exercised; the figures and verdicts mean "
            "nothing (the targets are for SD1.5 at 512 px on one H100)"
        )
    elif "H100" not in device.upper():
        print(f"note: the targets are for one H100; this device is {device}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="tiny-sd15 at 64 px on the CPU, batches 1 and 2: exercises the code",
    )
    parser.add_argument(
        "--targets-only", action="store_true", help="only the rows that issue 5's targets apply to"
    )
    parser.add_argument("--models", nargs="+", help="subset of sd15-random, sd21-random")
    parser.add_argument("--resolutions", nargs="+", type=int, help="subset of 512, 768")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default 1 8 (dry run: 1 2)")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument(
        "--ckpt",
        nargs="+",
        type=_bool,
        default=[False, True],
        help="gradient checkpointing: off on",
    )
    parser.add_argument(
        "--cached", nargs="+", type=_bool, default=[False, True], help="cache_latents: off on"
    )
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps (6; dry run 2)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (20; dry run 3)")
    parser.add_argument(
        "--images", type=int, help="synthetic images, at least (256; dry run: just enough)"
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--results", type=Path, help="JSON-lines file to append rows to / reuse")
    parser.add_argument("--fresh", action="store_true", help="measure again rows in --results")
    parser.add_argument(
        "--config-timeout", type=float, default=900.0, help="seconds one configuration may take"
    )
    parser.add_argument(
        "--trainer-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra train.py flag for every run, repeatable (e.g. --trainer-flag=--compile_unet)",
    )
    parser.add_argument("--verbose", action="store_true", help="the children's logs and bars")
    return parser.parse_args(argv)


def _bool(text: str) -> bool:
    words = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"{text!r}: use on or off")
    return words[text.lower()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
