"""What a string value may hold, and how values are shown in messages.

Every string of a configuration file or the command line is checked here: no NUL or other
control characters where they mean nothing, no lone surrogates (JSON ``\\udcxx`` escapes, or
bytes that are not UTF-8 on the command line, which Python carries as surrogate escapes), and
for paths and file-name parts the file system's limits in UTF-8 bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Literal

from config.limits import NAME_MAX_BYTES, PATH_MAX_BYTES

# line: one line of text (most keys); text: prompts, where tabs and line breaks are whitespace;
# path: a file or folder; name: a part of a file name (project_name, run_name).
TextKind = Literal["line", "text", "path", "name"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_TEXT_WHITESPACE = frozenset("\t\n\r")
_SEPARATORS = frozenset({"/", "\\", os.sep})
_LONG_DIGITS = 17  # longer whole numbers are shown as 1e+30


class InvalidValueError(ValueError):
    """A value that does not fit its field; the message says what was expected.

    ``index`` is the position inside a list (``[1]``) when the problem is one item's.
    """

    def __init__(self, message: str, index: str = "") -> None:
        super().__init__(message)
        self.index = index


def describe(value: Any) -> str:
    """A value as JSON would write it, shortened where it is huge."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return number_text(value)
    if isinstance(value, str):
        shown = value if len(value) <= 80 else value[:77] + "..."
        return json.dumps(shown)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def number_text(number: float) -> str:
    """A number for messages: whole numbers in full (huge ones by their length), else ``%g``."""
    if isinstance(number, float):
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "Infinity" if number > 0 else "-Infinity"
        if not number.is_integer() or abs(number) >= 10**16:
            return f"{number:g}"
        number = int(number)
    if abs(number) < 10**_LONG_DIGITS:
        return str(number)
    try:
        return f"{float(number):g}"
    except OverflowError:
        return f"a {len(str(abs(number)))}-digit number"


def check_text(value: str, kind: TextKind, max_bytes: int | None = None) -> None:
    """Raise InvalidValueError when a string cannot be what ``kind`` says."""
    surrogate = _SURROGATE.search(value)
    if surrogate is not None:
        raise InvalidValueError(
            f"is not valid text: it holds {surrogate.group()!a} (a lone surrogate: bytes "
            "that are not UTF-8, or a \\udcxx escape in JSON)"
        )
    for control in _CONTROL.finditer(value):
        if kind == "text" and control.group() in _TEXT_WHITESPACE:
            continue
        raise InvalidValueError(
            f"holds the control character {control.group()!a} at position "
            f"{control.start()}; it has no meaning here"
        )
    size = len(value.encode("utf-8"))
    if kind == "path":
        _check_path(value, size)
    elif kind == "name":
        _check_name(value, size, NAME_MAX_BYTES if max_bytes is None else max_bytes)
    elif max_bytes is not None and size > max_bytes:
        raise InvalidValueError(f"is {size} bytes long (UTF-8); at most {max_bytes} are allowed")


def _check_path(value: str, size: int) -> None:
    if not value:
        raise InvalidValueError("expected a path, got an empty string")
    if size >= PATH_MAX_BYTES:
        raise InvalidValueError(
            f"is {size} bytes long (UTF-8); a path may have at most {PATH_MAX_BYTES - 1}"
        )
    for part in re.split("[/" + re.escape(os.sep) + "]", value):
        part_size = len(part.encode("utf-8"))
        if part_size > NAME_MAX_BYTES:
            raise InvalidValueError(
                f"has a folder or file name of {part_size} bytes (UTF-8, starting "
                f"{describe(part[:20])}); each may have at most {NAME_MAX_BYTES}"
            )


def _check_name(value: str, size: int, max_bytes: int) -> None:
    if not value:
        raise InvalidValueError("expected a name, got an empty string")
    if value in (".", ".."):
        raise InvalidValueError(f"{describe(value)} is not a name")
    separators = sorted(_SEPARATORS.intersection(value))
    if separators:
        raise InvalidValueError(
            f"holds the path separator {separators[0]!r}; it is part of file and folder "
            "names, so it must be a plain name"
        )
    if value.startswith("."):
        raise InvalidValueError("must not start with '.' (the run's folders would be hidden)")
    if size > max_bytes:
        raise InvalidValueError(
            f"is {size} bytes long (UTF-8); at most {max_bytes} are allowed, so that every "
            f"file name the run makes from it fits in {NAME_MAX_BYTES} bytes"
        )
