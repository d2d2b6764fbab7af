"""Agreement between processes when several train together (accelerate / torch.distributed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from config.errors import UserError

logger = logging.getLogger(__name__)


def any_process(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true in any process (the flag itself with a single process).

    Decisions that change the control flow (skip a backward, stop the run) must be the same in
    every process, or the gradient all-reduce waits forever.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def broadcast_int(value: int, device: torch.device) -> int:
    """The main process's ``value`` in every process (``value`` itself with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def broadcast_object(value: Any, device: torch.device) -> Any:
    """The main process's ``value`` (any picklable object) in every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=device if device.type == "cuda" else None)
    return holder[0]


def make_accelerator() -> Accelerator:
    """The accelerate state: one process, or several under ``accelerate launch``.

    Mixed precision, device placement and DDP wrapping are done by the trainer itself (it
    needs the grad scaler and the device choice in its own hands); accelerate provides the
    process group and the DDP wrapper.
    """
    check_engine(os.environ)  # before accelerate builds (and may fail on) an FSDP plugin
    # Without CUDA, accelerate forms a process group (gloo) only when told it runs on the CPU.
    accelerator = Accelerator(
        device_placement=False, mixed_precision="no", cpu=not torch.cuda.is_available()
    )
    check_process_group(accelerator.num_processes, os.environ)
    check_engine(os.environ, str(accelerator.distributed_type.value))
    return accelerator


# accelerate's distributed types the trainer runs: one process, or DDP (on CPUs or GPUs).
ENGINES = ("NO", "MULTI_CPU", "MULTI_GPU")


# What accelerate's launcher sets for --use_fsdp / --use_deepspeed (on a CPU, accelerate then
# forms a plain DDP group: the request would be dropped silently).
_ENGINE_REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def check_engine(env: Mapping[str, str], distributed_type: str = "NO") -> None:
    """`UserError` for an accelerate launch with an engine this trainer does not run (FSDP,
    DeepSpeed, Megatron, XLA), whether accelerate formed it or, on a CPU, dropped it: its
    wrapping would replace the parameters the trainer's own optimizers, EMA and checkpoints
    hold."""
    asked = [name for key, name in _ENGINE_REQUESTS.items() if env.get(key, "").lower() == "true"]
    if distributed_type not in ENGINES or asked:
        engine = asked[0] if asked else distributed_type
        raise UserError(
            f"accelerate launch asked for {engine}; this trainer runs one process or "
            "DDP: launch with --multi_gpu (on CPUs too) and without --use_fsdp or "
            "--use_deepspeed, or an accelerate config file whose distributed_type is "
            "MULTI_GPU (docs/multi-gpu.md)"
        )


def check_process_group(processes: int, env: Mapping[str, str]) -> None:
    """`UserError` when ``accelerate launch`` asked for several processes or machines but this
    process trains alone (``--num_machines 2`` without ``--multi_gpu`` starts independent
    single-process runs that would each train the whole dataset into the same logdir).

    accelerate's launcher sets ``MASTER_ADDR`` only when it was asked for more than one process
    or machine, and a process group it formed has more than one process.
    """
    launched = "ACCELERATE_USE_CPU" in env or "ACCELERATE_MIXED_PRECISION" in env
    if launched and "MASTER_ADDR" in env and processes == 1:
        raise UserError(
            "accelerate launch asked for several processes or machines (MASTER_ADDR "
            f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '?')}), but this process trains "
            "alone: the launch did not form a process group. Add --multi_gpu to every launch "
            "command (also on a CPU, and on each machine with --num_machines, --machine_rank, "
            "--main_process_ip and --main_process_port), or launch one process (docs/multi-gpu.md)"
        )


def training_device(accelerator: Accelerator, gpuid: int) -> torch.device:
    """``gpuid`` with one process; each process's own GPU under ``accelerate launch``."""
    if accelerator.num_processes > 1:
        logger.info(
            "process %d of %d on %s",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
        )
        return accelerator.device
    if torch.cuda.is_available():
        if gpuid >= torch.cuda.device_count():
            raise UserError(
                f"gpuid: {gpuid} does not exist; this machine has {torch.cuda.device_count()} "
                f"CUDA device(s) (0-{torch.cuda.device_count() - 1})"
            )
        torch.cuda.set_device(gpuid)
        logger.info("training on CUDA device %d: %s", gpuid, torch.cuda.get_device_name(gpuid))
        return torch.device("cuda", gpuid)
    logger.info("no CUDA device found: training on the CPU")
    return torch.device("cpu")


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every process (``values`` itself with a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    summed = values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed
