"""Processes for tests whose subject is the training, not the interpreter's start or the launcher.

A fresh Python costs each test about 6 seconds on 2 cores before train.py's first line (torch,
diffusers and transformers import), and ``accelerate launch`` three of them. Here a forkserver
imports them once per test worker, and each test forks its processes from it: ``run_forked`` is
``python train.py`` (its own stdout, stderr, exit status and signals), ``launch_group`` is
``accelerate launch``, whose processes get what a real launch gives them: accelerate's own
parser and checks turn the same flags (``--multi_gpu``, ``--config_file``, ``--use_fsdp``) into
accelerate's variables, and each rank gets torchrun's. Real launches and real interpreters stay
where they are the subject: two machines launched by ``accelerate launch``, a dry run's clean
standard output from the first import on, and ``--help`` without the heavy imports.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from argparse import Namespace
from pathlib import Path

from tests.e2e import REPO, free_port

# What every launched process imports before its first line: imported once in the forkserver.
PRELOAD = ["torch", "accelerate", "diffusers", "transformers", "train", "training.session"]
# The flags of a one-machine DDP launch, and of a launch with the shipped FSDP2 config.
DDP = ("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
FSDP = ("--config_file", str(REPO / "examples" / "accelerate_fsdp2.yaml"))
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def launch_group(
    script: Path, processes: int, *args: str, flags: tuple[str, ...] = DDP
) -> subprocess.CompletedProcess:
    """``accelerate launch <flags> --num_processes N script args`` on a free port, forked from
    the preloaded server. Flags without ``--multi_gpu`` or FSDP start one process, as
    accelerate's simple launcher does."""
    port = free_port()
    launch = [*flags, "--num_processes", str(processes), "--main_process_port", str(port)]
    parsed = _validated(launch, script, args)
    if parsed.multi_gpu or parsed.use_fsdp:
        from accelerate.utils.launch import prepare_multi_gpu_env

        launched = _strings(prepare_multi_gpu_env(parsed))
        envs = [launched | rank_env(rank, processes, port) for rank in range(processes)]
    else:
        from accelerate.utils.launch import prepare_simple_launcher_cmd_env

        envs = [_strings(prepare_simple_launcher_cmd_env(parsed)[1])]
    return run_processes(script, args, envs)


def run_forked(config: Path, *flags: str) -> subprocess.CompletedProcess:
    """``python train.py --config config flags`` as one process forked from the preloaded
    server, in this process's environment: `tests.e2e.run_subprocess` without the imports."""
    return run_processes(REPO / "train.py", ("--config", str(config), *flags), [{}])


def run_processes(
    script: Path, args: tuple[str, ...], envs: list[dict[str, str]], timeout: float = 600
) -> subprocess.CompletedProcess:
    """One process per entry of ``envs`` (added to this process's environment), side by side.
    ``stdout`` and ``stderr`` hold every process's, the first one's first; ``returncode`` is
    the first non-zero exit status, or 0."""
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
        stderr = "".join(_read(output.with_suffix(".err")) for output in outputs)
    failed = [process.exitcode for process in processes if process.exitcode != 0]
    return subprocess.CompletedProcess(
        [str(script), *args], failed[0] if failed else 0, stdout, stderr
    )


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _strings(env: dict) -> dict[str, str]:
    return {key: str(value) for key, value in env.items()}


def _validated(launch: list[str], script: Path, args: tuple[str, ...]) -> Namespace:
    """The launch's arguments after accelerate's own parser and checks (config file included)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args([*launch, str(script), *args])
    return _validate_launch_command(parsed)[0]


def rank_env(rank: int, processes: int, port: int) -> dict[str, str]:
    """What torchrun gives process ``rank`` of a one-machine group."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "1",
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
