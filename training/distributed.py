"""Agreement between processes when several train together (accelerate / torch.distributed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
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


def make_accelerator() -> tuple[Accelerator, FsdpOptions | None]:
    """The accelerate state: one process, or several under ``accelerate launch``; and the FSDP
    options when the launch asked for FSDP2 (None: one process or DDP).

    Mixed precision, device placement, DDP wrapping and FSDP sharding are done by the trainer
    itself (it needs the grad scaler, the device choice and the optimizers in its own hands);
    accelerate provides the process group, the DDP wrapper and the launch configuration.
    """
    check_engine(os.environ)  # before accelerate builds (and may fail on) an FSDP plugin
    # Without CUDA, accelerate forms a process group (gloo) only when told it runs on the CPU.
    accelerator = Accelerator(
        device_placement=False, mixed_precision="no", cpu=not torch.cuda.is_available()
    )
    check_process_group(accelerator.num_processes, os.environ)
    fsdp = check_engine(os.environ, str(accelerator.distributed_type.value))
    return accelerator, fsdp


@dataclass(frozen=True)
class FsdpOptions:
    """What an FSDP2 launch asked for, as the trainer runs it (`training.fsdp`)."""

    # Free each gathered block after its forward (FULL_SHARD); false keeps it until the
    # backward (SHARD_GRAD_OP: more memory, fewer all-gathers).
    reshard_after_forward: bool = True


# accelerate's distributed types the trainer runs: one process, DDP (on CPUs or GPUs), FSDP2.
ENGINES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP")

# What accelerate's launcher sets for --use_fsdp / --use_deepspeed (on a CPU, accelerate then
# forms a plain process group and leaves the FSDP request in the environment only).
FSDP_REQUEST = "ACCELERATE_USE_FSDP"
_DEEPSPEED_REQUEST = "ACCELERATE_USE_DEEPSPEED"

# FSDP settings of an accelerate config that the trainer does not run, and why.
_FSDP_REFUSED = {
    "FSDP_OFFLOAD_PARAMS": "parameter offload to the CPU is not supported: the trainer keeps "
    "the sharded weights on the GPU",
    "FSDP_ACTIVATION_CHECKPOINTING": "use the trainer's gradient_checkpointing key instead "
    "(it checkpoints the UNet's and text encoders' blocks)",
}


def check_engine(env: Mapping[str, str], distributed_type: str = "NO") -> FsdpOptions | None:
    """The FSDP options of an FSDP2 launch (None for one process or DDP); `UserError` for an
    engine this trainer does not run (DeepSpeed, Megatron, XLA, FSDP1, FSDP settings it does not
    honour), whether accelerate formed it or, on a CPU, dropped it."""
    if env.get(_DEEPSPEED_REQUEST, "").lower() == "true" or distributed_type not in ENGINES:
        engine = "DEEPSPEED" if distributed_type in ENGINES else distributed_type
        raise UserError(
            f"accelerate launch asked for {engine}; this trainer runs one process, DDP "
            "(--multi_gpu, on CPUs too) or FSDP2 (--use_fsdp --fsdp_version 2, or "
            "examples/accelerate_fsdp2.yaml); see docs/multi-gpu.md"
        )
    if env.get(FSDP_REQUEST, "").lower() != "true" and distributed_type != "FSDP":
        return None
    problems = []
    if env.get("FSDP_VERSION", "1") != "2":
        problems.append(
            f"fsdp_version {env.get('FSDP_VERSION', '1')}: the trainer runs FSDP2 only "
            "(--fsdp_version 2, or fsdp_version: 2 in the accelerate config)"
        )
    for key, why in _FSDP_REFUSED.items():
        if env.get(key, "false").lower() == "true":
            problems.append(f"{key.lower()}: {why}")
    if problems:
        raise UserError(
            "accelerate launch asked for FSDP with settings this trainer does not run: "
            + "; ".join(problems)
            + " (examples/accelerate_fsdp2.yaml, docs/multi-gpu.md)"
        )
    # accelerate writes fsdp_reshard_after_forward as a boolean, or as an FSDP1 strategy name
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").upper()
    return FsdpOptions(reshard_after_forward=reshard not in ("FALSE", "SHARD_GRAD_OP", "NO_SHARD"))


def check_process_group(processes: int, env: Mapping[str, str]) -> None:
    """`UserError` when ``accelerate launch`` asked for several processes or machines but this
    process trains alone (``--num_machines 2`` without ``--multi_gpu`` starts independent
    single-process runs that would each train the whole dataset into the same logdir).

    accelerate's launcher sets ``MASTER_ADDR`` only when it was asked for more than one process
    or machine, or for FSDP (then through torchrun, which also sets ``WORLD_SIZE``), and a
    process group it formed has more than one process.
    """
    launched = "ACCELERATE_USE_CPU" in env or "ACCELERATE_MIXED_PRECISION" in env
    alone = env.get("WORLD_SIZE") == "1"  # torchrun asked for one process (FSDP on one GPU)
    if launched and "MASTER_ADDR" in env and processes == 1 and not alone:
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
