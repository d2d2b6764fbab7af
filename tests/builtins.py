"""The tiny built-in models, built once per test process and handed out as copies.

The suite builds ``tiny-sd15``, ``tiny-sd21`` and ``tiny-sdxl`` about three hundred times (every
run of train.py, every test that needs a model). A build draws every weight from its seeded
initialization; a deep copy of the first build is the same bundle (weights, configs, eval mode,
tokenizers) in half the time. `install` puts `build_builtin_once` where train.py and the tests
find ``build_builtin``; the full-size models are built each time (a kept copy would hold GBs).

Tests of the build itself (its determinism, the caller's RNG) call `build_uncached`.
"""

from __future__ import annotations

import copy

import models.builtin
import models.loading
from models.bundle import ModelBundle

build_uncached = models.builtin.build_builtin
_PRISTINE: dict[str, ModelBundle] = {}


def build_builtin_once(name: str) -> ModelBundle:
    """``build_builtin(name)``: a copy of this process's first build of a tiny model."""
    if not name.startswith("tiny-"):
        return build_uncached(name)
    if name not in _PRISTINE:
        _PRISTINE[name] = build_uncached(name)
    return copy.deepcopy(_PRISTINE[name])


def install() -> None:
    """Make ``build_builtin`` (and what `models.load_models` calls) `build_builtin_once`."""
    models.builtin.build_builtin = build_builtin_once
    models.loading.build_builtin = build_builtin_once
