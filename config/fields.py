"""Typed configuration fields: one declaration gives the default, the help text and the rules.

A configuration class is a dataclass whose fields are declared with `setting(...)`. The same
declaration drives JSON validation, command-line flags, ``--help`` and the key tables of
docs/reference.md, so a key, its flag and its field are always the same word.

`null` (None) always means "not set": it is accepted for every field and leaves the default (or
an inherited value) in place. Any other value must have the field's type and satisfy its rules:

- numbers are finite (NaN and ±Infinity are refused, except ``Infinity`` where a rule says
  ``allow_infinity``) and lie within the field's minimum and maximum;
- a whole number may be written ``2`` or ``2.0`` (or ``1e3``); ``2.5`` is refused;
- strings hold no lone surrogates and no control characters (prompts may hold tabs and line
  breaks); paths and names fit the file system (see `config.text`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from config.errors import did_you_mean
from config.limits import NAME_MAX_BYTES, PATH_MAX_BYTES
from config.text import InvalidValueError, TextKind, check_text, describe, number_text

__all__ = [
    "InvalidValueError",
    "Rule",
    "allowed_text",
    "check_value",
    "defaults_of",
    "field_types",
    "parse_fields",
    "rule_of",
    "setting",
    "strip_optional",
]

Status = Literal["supported", "deprecated"]


@dataclass(frozen=True)
class Rule:
    """What a field accepts, beyond its Python type.

    The numeric rules apply to a number, or to each number of a list or pair. ``group`` names
    the ``--help`` section of a train.json key.
    """

    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    status: Status = "supported"
    note: str = ""  # why a key is deprecated or not supported
    multiple_of: int | None = None
    allow_infinity: bool = False  # Infinity is a meaningful value (above every maximum)
    text: TextKind = "line"
    max_bytes: int | None = None
    min_items: int | None = None
    group: str = ""

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
    exclusive_maximum: bool = False,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    status: Status = "supported",
    note: str = "",
    multiple_of: int | None = None,
    allow_infinity: bool = False,
    text: TextKind = "line",
    max_bytes: int | None = None,
    min_items: int | None = None,
    group: str = "",
) -> Any:
    """Declare a configuration field: its default, help text and rules."""
    rule = Rule(
        help=help,
        minimum=minimum,
        maximum=maximum,
        exclusive_minimum=exclusive_minimum,
        exclusive_maximum=exclusive_maximum,
        choices=choices,
        status=status,
        note=note,
        multiple_of=multiple_of,
        allow_infinity=allow_infinity,
        text=text,
        max_bytes=max_bytes,
        min_items=min_items,
        group=group,
    )
    return field(default=default, metadata={"rule": rule})


def rule_of(f: dataclasses.Field) -> Rule:
    """The `Rule` declared for a field."""
    rule = f.metadata.get("rule")
    assert isinstance(rule, Rule), f"field {f.name} was not declared with setting()"
    return rule


def strip_optional(tp: Any) -> Any:
    """`X | None` → `X`; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, f"unsupported union {tp}"
        return args[0]
    return tp


def allowed_text(rule: Rule) -> str:
    """What a rule allows, for messages, ``--help`` and docs/reference.md: ``>= 1; <= 1024``."""
    parts = []
    choices = rule.allowed_choices()
    if choices is not None:
        parts.append(", ".join(choices))
    if rule.minimum is not None:
        parts.append(f"{'>' if rule.exclusive_minimum else '>='} {number_text(rule.minimum)}")
    if rule.maximum is not None:
        parts.append(f"{'<' if rule.exclusive_maximum else '<='} {number_text(rule.maximum)}")
    if rule.allow_infinity:
        parts[-1] += " or Infinity"  # a rule that allows Infinity has a minimum
    if rule.multiple_of is not None:
        parts.append(f"a multiple of {rule.multiple_of}")
    if rule.min_items is not None:
        parts.append(f"at least {rule.min_items} item{'s' if rule.min_items > 1 else ''}")
    if rule.text == "path":
        parts.append(f"a path of at most {PATH_MAX_BYTES - 1} bytes")
    elif rule.text == "name":
        size = NAME_MAX_BYTES if rule.max_bytes is None else rule.max_bytes
        parts.append(f"a plain name of at most {size} bytes")
    return "; ".join(parts)


def _whole_number(value: Any, rule: Rule) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise InvalidValueError(f"expected a whole number{_range(rule)}, got {describe(value)}")


def _number(value: Any, rule: Rule) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidValueError(f"expected a number{_range(rule)}, got {describe(value)}")
    number = float(value)  # Python ints beyond 1e308 cannot be floats: JSON's bounds catch them
    if math.isnan(number) or (math.isinf(number) and not (rule.allow_infinity and number > 0)):
        raise InvalidValueError(f"expected a finite number{_range(rule)}, got {describe(value)}")
    return number


def _range(rule: Rule) -> str:
    allowed = allowed_text(dataclasses.replace(rule, choices=None, min_items=None))
    return f" ({allowed})" if allowed else ""


def _convert(value: Any, tp: Any, rule: Rule) -> Any:
    """A non-null JSON value in the field's type; raises InvalidValueError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InvalidValueError(f"expected true or false, got {describe(value)}")
    if tp is int:
        return _whole_number(value, rule)
    if tp is float:
        return _number(value, rule)
    if tp is str:
        if not isinstance(value, str):
            raise InvalidValueError(f"expected a string, got {describe(value)}")
        check_text(value, rule.text, rule.max_bytes)
        return value
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise InvalidValueError(f"expected a list, got {describe(value)}")
        if rule.min_items is not None and len(value) < rule.min_items:
            raise InvalidValueError(
                f"expected a list of at least {rule.min_items} item(s), got {describe(value)}"
            )
        return [_item(v, item_type, rule, i) for i, v in enumerate(value)]
    if typing.get_origin(tp) is tuple:
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise InvalidValueError(
                f"expected a list of {len(item_types)} numbers, got {describe(value)}"
            )
        return tuple(
            _item(v, t, rule, i) for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        )
    if tp is typing.Any:
        return value
    raise AssertionError(f"unsupported field type {tp}")


def _item(value: Any, tp: Any, rule: Rule, index: int) -> Any:
    """One item of a list or pair, checked by the field's rule; errors name the index."""
    try:
        if value is None:
            raise InvalidValueError("null is not allowed inside a list")
        typed = _convert(value, tp, rule)
        _check_rule(typed, rule)
    except InvalidValueError as error:
        raise InvalidValueError(str(error), f"[{index}]{error.index}") from None
    return typed


def _check_rule(value: Any, rule: Rule) -> None:
    """Raise InvalidValueError when a typed scalar breaks its field's rule."""
    choices = rule.allowed_choices()
    if choices is not None and isinstance(value, str) and value not in choices:
        allowed = ", ".join(choices)
        hint = did_you_mean(value, choices)
        raise InvalidValueError(f"{describe(value)} is not one of: {allowed}{hint}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if rule.minimum is not None:
        too_small = value <= rule.minimum if rule.exclusive_minimum else value < rule.minimum
        if too_small:
            op = ">" if rule.exclusive_minimum else ">="
            raise InvalidValueError(
                f"must be {op} {number_text(rule.minimum)}, got {number_text(value)}"
            )
    if rule.maximum is not None and value != math.inf:
        too_large = value >= rule.maximum if rule.exclusive_maximum else value > rule.maximum
        if too_large:
            op = "<" if rule.exclusive_maximum else "<="
            raise InvalidValueError(
                f"must be {op} {number_text(rule.maximum)}, got {number_text(value)}"
            )
    if rule.multiple_of is not None and value % rule.multiple_of != 0:
        raise InvalidValueError(
            f"must be a multiple of {rule.multiple_of}, got {number_text(value)}"
        )


def check_value(raw: Any, tp: Any, rule: Rule) -> Any:
    """Check a non-null JSON value against a field's type and rule; return it in that type.

    Raises InvalidValueError naming what was expected (and, for a list item, its index).
    """
    tp = strip_optional(tp)
    value = _convert(raw, tp, rule)
    if not isinstance(value, (list, tuple)):
        _check_rule(value, rule)
    return value


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
            shown = path if path.isprintable() else ascii(path)[1:-1]
            problems.append(f"{where}: {shown}: unknown key{hint}")
            continue
        if raw is None:
            continue
        try:
            values[name] = check_value(raw, hints[name], rule_of(fields[name]))
        except InvalidValueError as exc:
            problems.append(f"{where}: {path}{exc.index}: {exc}")
    return values, problems


def defaults_of(cls: type) -> dict[str, Any]:
    """Every field's default, from its declaration."""
    return {f.name: f.default for f in dataclasses.fields(cls)}
