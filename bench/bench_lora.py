"""LoRA against a full fine-tune on the CPU: step time and peak RSS, as ratios, in one run.

    .venv/bin/python bench/bench_lora.py [--model sd15-random] [--rank 16] [--steps 4]

Each variant runs in its own Python process (so each peak RSS is its own): train.py's building
code and training loop (`bench.trainer_harness`) on the bundled images at 64 px, batch 1, Lion
(one state tensor per parameter: the full fine-tune of ``sd15-random`` fits a 24 GiB machine).
The first optimizer step is a warm-up; the median of the next ``--steps`` is reported. The
peak RSS includes building the model (the same in both variants). Prints one table and the
ratios LoRA / full.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.trainer_harness import (
    REPO,
    BenchmarkFinished,
    build_run_from_flags,
    train_with_hook,
    write_optimizer_json,
)
from training.context import TrainingContext

VARIANTS = ("full", "lora")


def flags(args: argparse.Namespace, variant: str, folder: Path) -> list[str]:
    out = [
        "--resume_ckpt",
        args.model,
        "--data_root",
        str(REPO / "examples" / "data"),
        "--resolution",
        "64",
        "--batch_size",
        "1",
        "--max_epochs",
        "100",
        "--optimizer_config",
        str(write_optimizer_json(folder, "lion")),
        "--logdir",
        str(folder / "logs"),
        "--project_name",
        f"bench-{variant}",
        "--dataloader_num_workers",
        "0",
    ]
    if variant == "lora":
        out += ["--lora_rank", str(args.rank)]
    return out


def measure(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """One variant, in this process: median seconds per step and peak RSS in GiB."""
    times: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        run, accelerator = build_run_from_flags(flags(args, variant, Path(folder)))
        last = time.perf_counter()

        def hook(ctx: TrainingContext) -> None:
            nonlocal last
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if len(times) > args.steps:
                raise BenchmarkFinished

        train_with_hook(run, accelerator, hook)
        trainable = sum(t.trainable_parameters for t in run.trainings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"step_s": statistics.median(times[1:]), "peak_gib": peak, "trainable": trainable}


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--one", variant, "--model", args.model]
    command += ["--rank", str(args.rank), "--steps", str(args.steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    results = {variant: run_variant(args, variant) for variant in VARIANTS}
    print(
        f"{args.model}, 64 px, batch 1, Lion, LoRA rank {args.rank}; median of {args.steps} steps"
    )
    print(f"{'variant':<8} {'trainable params':>17} {'s/step':>8} {'peak RSS GiB':>13}")
    for variant, r in results.items():
        print(f"{variant:<8} {r['trainable']:>17,} {r['step_s']:>8.3f} {r['peak_gib']:>13.2f}")
    full, lora = results["full"], results["lora"]
    print(
        f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, "
        f"peak RSS {lora['peak_gib'] / full['peak_gib']:.2f}x"
    )


if __name__ == "__main__":
    main()
