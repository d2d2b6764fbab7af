"""The key tables of docs/reference.md, generated from the configuration classes.

    python -m config.docs            # print the tables
    python -m config.docs --write    # replace them in docs/reference.md between their markers

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers. A test
checks that docs/reference.md holds exactly what this module generates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any

from config.fields import allowed_text, rule_of, strip_optional
from config.train_config import TrainConfig

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


class Words(str):
    """A default described in words (``the run's seed``), written as it is."""


def _value(value: Any) -> str:
    if isinstance(value, Words):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "infinity"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _type_name(tp: Any) -> str:
    tp = strip_optional(tp)
    name = getattr(tp, "__name__", None)
    if name in ("bool", "int", "float", "str"):
        return {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}[name]
    text = str(tp).replace("typing.", "")
    names = {
        "tuple[float, float]": "[number, number]",
        "tuple[int, int]": "[integer, integer]",
        "list[str]": "list of strings",
        "list[float]": "list of numbers",
    }
    return names.get(text, "any")


def _allowed(rule: Any) -> str:
    parts = allowed_text(rule).split("; ")
    choices = rule.allowed_choices()
    if choices is not None:
        parts[0] = ", ".join(f"`{c}`" for c in choices)
    return "; ".join(p for p in parts if p)


def _rows(
    cls: type,
    defaults: dict[str, Any],
    skip: tuple[str, ...] = (),
    status_names: dict[str, str] | None = None,
) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        rule = rule_of(f)
        help_text = rule.help
        if rule.status != "supported":
            status = (status_names or {}).get(rule.status, rule.status)
            help_text = f"**{status}**: {rule.note}. {help_text}"
        rows.append(
            f"| `{f.name}` | {_type_name(hints[f.name])} | {_value(defaults[f.name])} | "
            f"{_allowed(rule)} | {help_text} |"
        )
    return rows


HEADER = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]


def train_table() -> str:
    """Every train.json key (and command-line flag)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return "\n".join(HEADER + _rows(TrainConfig, defaults))


# The optimizer package depends on config, never the reverse: this documentation tool imports
# it only when it makes the optimizer tables.


def optimizer_table() -> str:
    """The keys of optimizer.json's base / text_encoder_overrides sections."""
    from optimizer.config import BUILTIN, OptimizerSection

    defaults = {f.name: getattr(BUILTIN, f.name) for f in dataclasses.fields(OptimizerSection)}
    return "\n".join(HEADER + _rows(OptimizerSection, defaults))


def top_level_table() -> str:
    """optimizer.json's top-level keys and text_encoder_freezing's keys."""
    from optimizer.config import TOP_DEFAULTS, OptimizerFile
    from optimizer.freezing import FreezingConfig

    top_defaults = {f.name: None for f in dataclasses.fields(OptimizerFile)} | TOP_DEFAULTS
    freezing_defaults = {
        "freeze_embeddings": False,
        "freeze_front_n_layers": None,
        "freeze_final_layer_norm": False,
        "unfreeze_final_n_layers": None,
    }
    rows = _rows(OptimizerFile, top_defaults)
    rows += [
        r.replace("| `", "| `text_encoder_freezing.", 1)
        for r in _rows(FreezingConfig, freezing_defaults)
    ]
    return "\n".join(HEADER + rows)


def sample_tables() -> tuple[str, str]:
    """sample_prompts.json's top-level keys, and the keys of each entry of ``samples``."""
    from training.samples.prompts import SampleEntry, SampleFile

    top = {f.name: None for f in dataclasses.fields(SampleFile)} | {
        "samples": Words("none: random captions"),
        "seed": Words("the run's seed"),
        "cfgs": [7, 4, 1.01],
        "scheduler": "ddim",
        "num_inference_steps": 30,
        "resolution": Words("the run's resolution"),
        "show_progress_bars": False,
        "generate_samples_every_n_steps": Words("the run's sample_steps"),
        "generate_pretrain_samples": False,
    }
    entry = {f.name: None for f in dataclasses.fields(SampleEntry)} | {
        "negative_prompt": "",
        "seed": Words("the file's seed"),
        "size": Words("the file's resolution, square"),
        "random_caption": False,
        "cfgs": Words("the file's cfgs"),
    }
    return (
        "\n".join(HEADER + _rows(SampleFile, top, status_names={"deprecated": "ignored"})),
        "\n".join(HEADER + _rows(SampleEntry, entry)),
    )


def validation_table() -> str:
    """The keys of a validation settings file (EveryDream2's validation_default.json)."""
    from config.validation_config import ValidationFile

    defaults = {f.name: f.default for f in dataclasses.fields(ValidationFile)} | {
        "extra_manual_datasets": Words("`{}`"),
        "batch_size": Words("train.json's batch_size"),
    }
    return "\n".join(HEADER + _rows(ValidationFile, defaults))


TABLES = {
    "train": train_table,
    "optimizer": optimizer_table,
    "optimizer-top": top_level_table,
    "samples": lambda: sample_tables()[0],
    "samples-entry": lambda: sample_tables()[1],
    "validation": validation_table,
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)(\n<!-- /table:{name} -->)", re.DOTALL)


def marked_table(text: str, name: str) -> str | None:
    """The table between a document's markers for ``name``, or None without markers."""
    match = _pattern(name).search(text)
    return None if match is None else match.group(2)


def write_tables(path: Path = REFERENCE) -> None:
    """Replace every table between its markers in ``path`` with what the code generates."""
    text = path.read_text(encoding="utf-8")
    for name, make in TABLES.items():
        text = _pattern(name).sub(lambda m, make=make: m.group(1) + make() + m.group(3), text)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update docs/reference.md in place")
    if parser.parse_args().write:
        write_tables()
    else:
        for name, make in TABLES.items():
            print(f"<!-- table:{name} -->\n{make()}\n<!-- /table:{name} -->\n")
