"""The dry run's memory forecast against a real run's peak memory, on this CPU, in one run.

    .venv/bin/python bench/bench_memory.py [--model sd15-random] [--sizes 64 128 192 256]

For each size, in a fresh Python process: build the run as train.py does (square images of that
size, batch 1, the UNet and the text encoder trained with adamw8bit, the VAE in the step), read
the dry run's forecast (`memory.peak_bytes`: weights, gradients, optimizer state and the
activations measured on fake tensors), then train --steps optimizer steps and read the peak
resident memory. "Measured" is that peak less the process's resident memory before the model was
built (the Python and library baseline, which the forecast does not count). Prints a table of
forecast / measured with the target: within 15%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.bench_cache import rss_kib
from bench.trainer_harness import (
    BenchmarkFinished,
    build_run_from_flags,
    train_with_hook,
    write_optimizer_json,
)

TOLERANCE = 0.15


def flags(args: argparse.Namespace, size: int, folder: Path) -> list[str]:
    data = folder / "data"
    data.mkdir()
    for n in range(4):
        Image.new("RGB", (size, size), (40 * n, 90, 200)).save(data / f"square {n}.png")
    return [
        "--resume_ckpt",
        args.model,
        "--data_root",
        str(data),
        "--resolution",
        str(size),
        "--batch_size",
        "1",
        "--max_epochs",
        "100",
        "--optimizer_config",
        str(write_optimizer_json(folder, "adamw8bit")),
        "--logdir",
        str(folder / "logs"),
        "--dataloader_num_workers",
        "0",
        "--flip_p",
        "0",
    ] + (["--gradient_checkpointing"] if args.checkpointing else [])


def measure(args: argparse.Namespace, size: int) -> dict[str, float]:
    """One size, in this process: forecast and measured bytes."""
    from training.report import memory_report

    base = rss_kib() * 1024
    steps = 0
    with tempfile.TemporaryDirectory() as folder:
        run, accelerator = build_run_from_flags(flags(args, size, Path(folder)))
        forecast = memory_report(run)
        peak = 0

        def hook(ctx: object) -> None:
            nonlocal steps, peak
            steps += 1
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if steps >= args.steps:
                raise BenchmarkFinished

        train_with_hook(run, accelerator, hook)
    return {
        "forecast": forecast["peak_bytes"],
        "static": forecast["total_bytes"],
        "activations": forecast["activations"]["total_bytes"],
        "measured": peak - base,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    print(
        f"{args.model}, batch 1, adamw8bit, UNet and text encoder trained, "
        f"gradient checkpointing {'on' if args.checkpointing else 'off'}"
    )
    print(
        "| px | weights+grads+state GiB | activations GiB | forecast GiB | measured GiB "
        "| forecast / measured | within 15% |\n|---|---|---|---|---|---|---|"
    )
    for size in args.sizes:
        command = [sys.executable, __file__, "--one", str(size), "--model", args.model]
        command += ["--steps", str(args.steps)] + (["--checkpointing"] * args.checkpointing)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{size} px failed:\n{result.stderr[-3000:]}")
        r = json.loads(result.stdout.strip().splitlines()[-1])
        ratio = r["forecast"] / r["measured"]
        verdict = "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL"
        gib = [r[k] / 2**30 for k in ("static", "activations", "forecast", "measured")]
        print(
            f"| {size} | " + " | ".join(f"{g:.2f}" for g in gib) + f" | {ratio:.3f} | {verdict} |"
        )


if __name__ == "__main__":
    main()
