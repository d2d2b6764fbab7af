"""bench_cuda.py's command line: the matrix's dimensions and how rows run."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor")
DEFAULT_OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit")
# What a row trains besides the matrix's settings: the full weights, LoRA adapters, the full
# weights with a fused backward pass (memory: no full set of gradients), or the full weights
# sharded by FSDP2 over 1 or 2 processes (`FSDP_PROCESSES`).
VARIANT_FLAGS = {
    "full": [],
    "lora16": ["--lora_rank", "16"],
    "fused": ["--fused_backward_pass", "true"],
    "fsdp1": [],
    "fsdp2": [],
}
# FSDP rows: launched by accelerate with examples/accelerate_fsdp2.yaml in this many processes
# (one GPU each); images/s counts every process's batch, peak memory is the main process's.
FSDP_PROCESSES = {"fsdp1": 1, "fsdp2": 2}


def fsdp_launch_flags(processes: int) -> list[str]:
    """``python -m accelerate.commands.launch`` with the shipped FSDP2 config."""
    with socket.socket() as probe:  # a free port: rows never share accelerate's default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(Path(__file__).resolve().parent.parent / "examples" / "accelerate_fsdp2.yaml"),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port),
    ]


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    _matrix_arguments(parser)
    _run_arguments(parser)
    return parser.parse_args(argv)


def _matrix_arguments(parser: argparse.ArgumentParser) -> None:
    """Which rows: models, sizes, optimizers, variants, checkpointing, caching."""
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="tiny-sd15 at 64 px on the CPU, batches 1 and 2: exercises the code",
    )
    parser.add_argument(
        "--targets-only", action="store_true", help="only the rows that issue 5's targets apply to"
    )
    parser.add_argument(
        "--sdxl",
        action="store_true",
        help="SDXL's rows: sdxl-random at 1024 px, batches 1 and 4 (e.g. --sdxl --ckpt on "
        "--cached on --variants full lora16 --optimizers adafactor)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        help="subset of sd15-random, sd21-random (dry run: tiny-sd15, tiny-sdxl)",
    )
    parser.add_argument("--resolutions", nargs="+", type=int, help="subset of 512, 768")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default 1 8 (dry run: 1 2)")
    parser.add_argument(
        "--optimizers", nargs="+", choices=OPTIMIZERS, default=list(DEFAULT_OPTIMIZERS)
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANT_FLAGS),
        default=["full"],
        help="full weights, LoRA rank 16, a fused backward pass (e.g. --variants fused "
        "--optimizers adafactor --ckpt on: the memory issue's row), or FSDP2 on 1 or 2 GPUs "
        "(--variants fsdp1 fsdp2 --optimizers adamw: FSDP shards no 8-bit state)",
    )
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


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """How each row runs and where results go."""
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
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after each row's timed steps, profile 3 more and write DIR/<row>.txt: the GPU's "
        "busy share and the operators that took the most device and CPU time",
    )
    parser.add_argument("--verbose", action="store_true", help="the children's logs and bars")


def _bool(text: str) -> bool:
    words = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"{text!r}: use on or off")
    return words[text.lower()]
