"""Reading a hand-edited JSON file into a dict, with errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.errors import UserError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Load a JSON object from ``path``.

    ``what`` names the file's role in messages (``"train config"``, ``"optimizer config"``).
    A missing file, malformed JSON (with line and column) or a top level that is not an object
    raise UserError.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be read ({exc.strerror})") from None
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
