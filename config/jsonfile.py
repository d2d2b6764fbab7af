"""Reading hand-edited text and JSON files, with errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.errors import UserError


def read_text_file(path: Path, what: str, kind: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark dropped).

    ``what`` names the file's role and ``kind`` what it should be (``"a JSON file"``) in the
    `UserError` for a missing file, a folder, bytes that are not UTF-8 (with the line) or
    another OS error.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path}: is a folder, expected {kind}") from None
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{what} {path}: line {line}: not UTF-8 text ({exc.reason})") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Load a JSON object from ``path``.

    ``what`` names the file's role in messages (``"train config"``, ``"optimizer config"``).
    A missing file, malformed JSON (with line and column) or a top level that is not an object
    raise UserError.
    """
    text = read_text_file(path, what, "a JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what} {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError:  # Python reads whole numbers of at most 4300 digits
        raise UserError(
            f"{what} {path}: holds a whole number of more than 4300 digits; no key takes one"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a JSON object {{...}} at the top level")
    return data
