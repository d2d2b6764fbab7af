"""Typed configuration fields: one declaration gives the default, the help text and the rules.

A configuration class is a dataclass whose fields are declared with `setting(...)`. The same
declaration drives JSON validation, command-line flags and the README's key tables, so a key,
its flag and its field are always the same word.

`null` (None) always means "not set": it is accepted for every field and leaves the default (or
an inherited value) in place. Any other value must have the field's type and satisfy its rules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from config.errors import did_you_mean

Status = Literal["supported", "deprecated", "unsupported"]


@dataclass(frozen=True)
class Rule:
    """What a field accepts, beyond its Python type."""

    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    status: Status = "supported"
    note: str = ""  # why a key is deprecated or not supported

    def allowed_choices(self) -> tuple[str, ...] | None:
        """The choices, calling the provider when they are computed lazily."""
        if self.choices is None or isinstance(self.choices, tuple):
            return self.choices
        return self.choices()


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    status: Status = "supported",
    note: str = "",
) -> Any:
    """Declare a configuration field: its default, help text and rules."""
    rule = Rule(help, minimum, maximum, exclusive_minimum, choices, status, note)
    return field(default=default, metadata={"rule": rule})


def rule_of(f: dataclasses.Field) -> Rule:
    """The `Rule` declared for a field."""
    rule = f.metadata.get("rule")
    assert isinstance(rule, Rule), f"field {f.name} was not declared with setting()"
    return rule


class InvalidValueError(ValueError):
    """A value that does not fit its field; the message says what was expected."""


def strip_optional(tp: Any) -> Any:
    """`X | None` → `X`; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, f"unsupported union {tp}"
        return args[0]
    return tp


def _describe(value: Any) -> str:
    return json.dumps(value) if _is_jsonable(value) else repr(value)


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def convert(value: Any, tp: Any) -> Any:
    """Check a non-null JSON value against a field type and return it in that type.

    Raises InvalidValueError naming what was expected.
    """
    tp = strip_optional(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InvalidValueError(f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidValueError(f"expected a whole number, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                raise InvalidValueError("expected a number, got NaN")
            return float(value)
        raise InvalidValueError(f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise InvalidValueError(f"expected a string, got {_describe(value)}")
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise InvalidValueError(f"expected a list, got {_describe(value)}")
        return [convert(v, item_type) for v in value]
    if typing.get_origin(tp) is tuple:
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise InvalidValueError(
                f"expected a list of {len(item_types)} numbers, got {_describe(value)}"
            )
        return tuple(convert(v, t) for v, t in zip(value, item_types, strict=True))
    if tp is typing.Any:
        return value
    raise AssertionError(f"unsupported field type {tp}")


def check_rule(value: Any, rule: Rule) -> None:
    """Raise InvalidValueError when a typed value breaks its field's rule."""
    choices = rule.allowed_choices()
    if choices is not None and value not in choices:
        allowed = ", ".join(choices)
        hint = did_you_mean(str(value), choices)
        raise InvalidValueError(f"{_describe(value)} is not one of: {allowed}{hint}")
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if rule.minimum is not None:
            too_small = number <= rule.minimum if rule.exclusive_minimum else number < rule.minimum
            if too_small:
                op = ">" if rule.exclusive_minimum else ">="
                raise InvalidValueError(f"must be {op} {rule.minimum:g}, got {number:g}")
        if rule.maximum is not None and number > rule.maximum:
            raise InvalidValueError(f"must be <= {rule.maximum:g}, got {number:g}")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def parse_fields(
    cls: type,
    data: Mapping[str, Any],
    where: str,
    key_prefix: str = "",
    aliases: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Validate a JSON object against a dataclass's fields.

    Returns the typed values that were set (nulls left out) and a list of problems, each
    ``<where>: <key path>: <message>``. Unknown keys are problems with a "did you mean".
    ``aliases`` maps an accepted old spelling to its field name (the caller warns about it).
    """
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = aliases or {}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in data.items():
        name = aliases.get(key, key)
        path = f"{key_prefix}{key}"
        if name not in fields:
            hint = did_you_mean(key, list(fields) + list(aliases))
            problems.append(f"{where}: {path}: unknown key{hint}")
            continue
        if raw is None:
            continue
        try:
            value = convert(raw, hints[name])
            check_rule(value, rule_of(fields[name]))
        except InvalidValueError as exc:
            problems.append(f"{where}: {path}: {exc}")
            continue
        values[name] = value
    return values, problems


def defaults_of(cls: type) -> dict[str, Any]:
    """Every field's default, from its declaration."""
    return {f.name: f.default for f in dataclasses.fields(cls)}
