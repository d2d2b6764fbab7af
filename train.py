"""Fine-tune Stable Diffusion from EveryDream2-style JSON presets.

    python train.py --config train.json [--any_train_json_key value ...] [--dry_run]

Parse, load, validate, build, run. A mistake in the user's input ends the program with one
message on stderr and exit status 2; Ctrl-C saves a resumable checkpoint and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import TextIO

# Before the libraries load: transformers' import-time notices (torchvision is deliberately
# not installed) and bitsandbytes' note about 4-bit CPU kernels this trainer never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from config.cli import CommandLine, parse_command_line
from config.errors import UserError

# Nothing heavy is imported before the command line is parsed: `--help` and a mistyped flag
# answer at once, without loading torch's optimizers, diffusers or transformers.

logger = logging.getLogger("train")


def quiet_libraries() -> None:
    """Only warnings from diffusers/transformers, and no progress bars of theirs under ours.

    bitsandbytes' CPU backend warns at import when it cannot fetch its 4-bit matmul kernel from
    the hub; the trainer uses no 4-bit kernel, so only its errors are shown.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_warning()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit status.

    Standard output carries only the dry run's JSON: anything else printed (some optimizer
    packages print) goes to standard error with the logs.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _main(sys.argv[1:] if argv is None else argv, stdout)


def _main(argv: list[str], stdout: TextIO) -> int:
    try:
        with contextlib.redirect_stdout(stdout):  # --help goes to standard output
            command_line = parse_command_line(argv)
    except UserError as error:
        logger.error("%s", error)
        return 2
    quiet_libraries()
    return _run(command_line, stdout)


def _run(command_line: CommandLine, stdout: TextIO) -> int:
    from training.build import build_from_command_line
    from training.loop import TrainingDivergedError
    from training.report import dry_run_report
    from training.session import TrainingCrashedError, run_training

    try:
        run, accelerator = build_from_command_line(command_line)
        if command_line.dry_run:
            print(json.dumps(dry_run_report(run), indent=2), file=stdout)
            return 0
        run_training(run, accelerator)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return 0
    except UserError as error:
        logger.error("%s", error)
        return 2
    except (TrainingDivergedError, TrainingCrashedError) as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        logger.error("stopped by a second Ctrl-C: no checkpoint was saved")
        return 130


if __name__ == "__main__":
    sys.exit(main())
