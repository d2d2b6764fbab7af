"""Fine-tune Stable Diffusion from EveryDream2-style JSON presets.

    python train.py --config train.json [--any_train_json_key value ...] [--dry_run]

Parse, load, validate, build, run. A mistake in the user's input ends the program with one
message on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys

from config.cli import parse_command_line
from config.errors import UserError
from config.load import load_train_config
from optimizer.config import load_optimizer_config
from training.build import build_run, pick_device
from training.report import dry_run_report

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        command_line = parse_command_line(sys.argv[1:] if argv is None else argv)
        train = load_train_config(command_line)
        optim = load_optimizer_config(train)
        run = build_run(train, optim, pick_device(train.config.gpuid))
        if command_line.dry_run:
            print(json.dumps(dry_run_report(run), indent=2))
            return 0
        raise UserError("training is not available yet: use --dry_run")
    except UserError as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
