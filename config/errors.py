"""Errors that describe a user's mistake.

Anything raised as a `UserError` is reported by `train.py` as one message on stderr with exit
status 2 and no traceback. Programming errors (broken invariants) stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class UserError(Exception):
    """A mistake in the user's input: a file, a key, a value, a path."""


class ConfigError(UserError):
    """Every problem found while validating one or more configuration sources.

    Each problem is one line of the form ``<file>: <key.path>: <what is wrong>``.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        assert problems, "ConfigError needs at least one problem"
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems in the configuration:\n{lines}"
        super().__init__(message)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close valid name exists, else an empty string."""
    match = closest(name, choices)
    return f" (did you mean '{match}'?)" if match is not None else ""
