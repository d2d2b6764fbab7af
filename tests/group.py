"""Processes for tests whose subject is the training, not the interpreter's start or the launcher.

A fresh Python costs each test about 6 seconds on 2 cores before train.py's first line (torch,
diffusers and transformers import), and ``accelerate launch`` three of them. Here a forkserver
imports them once (the test files that use it share one worker: `tests/conftest.py`), and
each test forks its processes from it: ``run_forked`` is
``python train.py`` (its own stdout, stderr, exit status and signals), ``launch_group`` is
``accelerate launch``, whose processes get what a real launch gives them: accelerate's own
parser and checks turn the same flags (``--multi_gpu``, ``--config_file``, ``--use_fsdp``) into
accelerate's variables (``--machine_rank`` too: several machines run as localhost), and each
rank gets torchrun's; ``launch_alone`` is a launch that accelerate gives its simple launcher.
Real interpreters stay where they are the subject: a dry run's clean standard output from the
first import on, and ``--help`` without the heavy imports.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import sys
import tempfile
import traceback
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.e2e import REPO, free_port

# What every launched process imports before its first line: imported once in the forkserver.
PRELOAD = [
    *("torch", "accelerate", "diffusers", "transformers", "train", "training.session"),
    *("torch.utils.tensorboard", "diffusers.optimization", "diffusers.guiders"),
    "tests.warm",
]
# The flags of a DDP launch, and of a launch with the shipped FSDP2 config.
DDP = ("--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no")
FSDP = ("--config_file", str(REPO / "examples" / "accelerate_fsdp2.yaml"))
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


@dataclass
class Outcome:
    """How the processes ended, as ``subprocess.run`` tells it: ``stdout`` and ``stderr`` hold
    every process's, the first one's first; ``stderrs`` each process's."""

    returncode: int
    stdout: str
    stderr: str
    stderrs: list[str]


def launch_group(
    script: Path,
    processes: int,
    *args: str,
    flags: tuple[str, ...] = DDP,
    machines: int = 1,
) -> Outcome:
    """``accelerate launch <flags> --num_processes N script args`` on each of ``machines``
    machines (as localhost, ``--machine_rank`` 0, 1, ...), forked from the preloaded server:
    ``processes`` in all, as accelerate counts them."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    port, local = free_port(), processes // machines
    envs = []
    for machine in range(machines):
        launch = [
            *flags,
            *("--num_processes", str(processes), "--num_machines", str(machines)),
            *("--machine_rank", str(machine), "--main_process_ip", "127.0.0.1"),
            *("--main_process_port", str(port)),
        ]
        launched = _strings(prepare_multi_gpu_env(_validated(launch, script, args)))
        for rank in range(machine * local, (machine + 1) * local):
            envs.append(launched | rank_env(rank, processes, local, machines, port))
    return run_processes(script, args, envs)


def launch_alone(script: Path, *args: str, flags: tuple[str, ...]) -> Outcome:
    """``accelerate launch <flags> script args`` where accelerate runs its simple launcher
    (one process, no ``--multi_gpu``): forked from the preloaded server with the variables
    that launcher gives it."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    _, env = prepare_simple_launcher_cmd_env(_validated(list(flags), script, args))
    return run_processes(script, args, [_strings(env)])


def run_forked(config: Path, *flags: str) -> Outcome:
    """``python train.py --config config flags`` as one process forked from the preloaded
    server, in this process's environment: `tests.e2e.run_subprocess` without the imports."""
    return run_processes(REPO / "train.py", ("--config", str(config), *flags), [{}])


def run_processes(
    script: Path, args: tuple[str, ...], envs: list[dict[str, str]], timeout: float = 600
) -> Outcome:
    """One process per entry of ``envs`` (added to this process's environment), side by side;
    the outcome's ``returncode`` is the first non-zero exit status, or 0."""
    with tempfile.TemporaryDirectory() as folder:
        outputs = [Path(folder) / str(index) for index in range(len(envs))]
        processes = [
            _CONTEXT.Process(
                target=_process_main,
                args=(str(script), list(args), os.environ | env, str(output)),
            )
            for env, output in zip(envs, outputs, strict=True)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=timeout)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        stdout = "".join(_read(output.with_suffix(".out")) for output in outputs)
        stderrs = [_read(output.with_suffix(".err")) for output in outputs]
    failed = [process.exitcode for process in processes if process.exitcode != 0]
    return Outcome(failed[0] if failed else 0, stdout, "".join(stderrs), stderrs)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _strings(env: dict) -> dict[str, str]:
    return {key: str(value) for key, value in env.items()}


def _validated(launch: list[str], script: Path, args: tuple[str, ...]) -> Namespace:
    """The launch's arguments after accelerate's own parser and checks (config file included)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args([*launch, str(script), *args])
    return _validate_launch_command(parsed)[0]


def rank_env(rank: int, processes: int, local: int, machines: int, port: int) -> dict[str, str]:
    """What torchrun gives process ``rank`` of a group of ``local`` processes on each machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(local),
        "GROUP_RANK": str(rank // local),
        "GROUP_WORLD_SIZE": str(machines),
        "ROLE_NAME": "default",
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }


def _process_main(script: str, args: list[str], env: dict[str, str], output: str) -> None:
    """One process: its own stdout and stderr files, the launch's variables, the script as
    ``__main__``; exit handlers run as at a real process's end."""
    for stream, suffix in ((1, ".out"), (2, ".err")):
        descriptor = os.open(output + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(descriptor, stream)
        os.close(descriptor)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    os.chdir(REPO)
    sys.argv = [script, *args]
    sys.path.insert(0, str(REPO))
    code: int | str | None = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        code = done.code
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what the interpreter does with ``sys.exit("message")``
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
