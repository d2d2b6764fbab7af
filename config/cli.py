"""The command line: ``--config``, ``--dry_run`` and one flag per train.json key.

Flags are generated from `TrainConfig`, so every key is a flag of the same name. Only the flags
a user actually typed are returned; their values are checked by the same rules as train.json.
Booleans are flags (``--gradient_checkpointing``) that also take an explicit value
(``--gradient_checkpointing false``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.errors import ConfigError, did_you_mean
from config.fields import Rule, allowed_text, field_types, rule_of, strip_optional
from config.train_config import GROUPS, TrainConfig

CLI = "command line"
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class CommandLine:
    """What the user typed: the train.json path, the dry-run switch, and raw key values."""

    config: Path | None
    dry_run: bool
    values: dict[str, Any] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every TrainConfig field is a flag whose default is 'not typed'.

    Flags are grouped by ``setting(group=...)``; each flag's help says what is allowed and the
    default.
    """
    parser = argparse.ArgumentParser(
        prog="train.py",
        usage="train.py --config train.json [--KEY VALUE ...] [--dry_run]",
        description="Fine-tune Stable Diffusion 1.x/2.x from EveryDream2-style JSON presets. "
        "Every train.json key is also a flag of the same name; a flag overrides the file.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="train.json with the run's settings")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="build everything, print the resolved configuration as JSON and exit",
    )
    hints = field_types(TrainConfig)
    sections = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        rule = rule_of(f)
        _add_flag(sections[_group_of(rule)], f, rule, strip_optional(hints[f.name]))
    return parser


def _group_of(rule: Rule) -> str:
    """The --help section of a key: its declared group, else by its status."""
    if rule.group:
        return rule.group
    return "everydream2" if rule.status != "supported" else "training"


def _add_flag(group: Any, f: dataclasses.Field, rule: Rule, tp: Any) -> None:
    allowed = allowed_text(rule)
    help_text = rule.help if rule.status == "supported" else f"{rule.status}: {rule.note}."
    if allowed:
        help_text += f" Allowed: {allowed}."
    help_text += f" Default: {json.dumps(f.default)}."
    help_text = help_text.replace("%", "%%")
    if tp is bool:
        group.add_argument(f"--{f.name}", nargs="?", const="true", metavar="BOOL", help=help_text)
    elif typing.get_origin(tp) is list:
        group.add_argument(f"--{f.name}", nargs="+", metavar="VALUE", help=help_text)
    else:
        group.add_argument(f"--{f.name}", metavar="VALUE", help=help_text)


def _decode(text: str, tp: Any) -> Any:
    """A typed value from a command-line string (``null`` means not set)."""
    if text == "null":
        return None
    if tp is bool:
        lowered = text.lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        return text  # left for the type check to report
    if tp is str:
        return text
    try:
        return json.loads(text)
    except ValueError:  # not JSON, or a whole number of more than 4300 digits
        return text


def parse_command_line(argv: list[str]) -> CommandLine:
    """Parse argv; unknown flags are one ConfigError with a "did you mean"."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    flags = [f"--{f.name}" for f in dataclasses.fields(TrainConfig)] + ["--config", "--dry_run"]
    problems = []
    for arg in unknown:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            problems.append(f"{CLI}: {name}: unknown flag{did_you_mean(name, flags)}")
        else:
            problems.append(f"{CLI}: {arg!r}: unexpected value (flags take one value each)")
    if problems:
        raise ConfigError(problems)
    typed = vars(namespace)
    config = typed.pop("config", None)
    dry_run = typed.pop("dry_run", False)
    hints = field_types(TrainConfig)
    values: dict[str, Any] = {}
    for name, raw in typed.items():
        tp = strip_optional(hints[name])
        if isinstance(raw, list):
            values[name] = [_decode(item, typing.get_args(tp)[0]) for item in raw]
        else:
            values[name] = _decode(raw, tp)
    return CommandLine(config=config, dry_run=dry_run, values=values)
