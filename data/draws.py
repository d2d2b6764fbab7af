"""The random draws of epoch plans, from generators seeded by (seed, epoch, stream) alone.

Only `random.Random.random()` is used (its sequence for a given integer seed is guaranteed
across Python versions; `shuffle`/`sample` are not), with hand-written Fisher-Yates on top.
Nothing here touches the global RNG state of Python, NumPy or torch.
"""

from __future__ import annotations

import hashlib
import math
import operator
import random
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def generator(seed: int, epoch: int, stream: str) -> random.Random:
    """The generator of one stream ("order", "augment", ...) of one epoch."""
    digest = hashlib.sha256(f"dreamtrainer-data:{stream}:{seed}:{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def below(rng: random.Random, n: int) -> int:
    """A uniform integer in 0..n-1 from `random()` only."""
    return min(int(rng.random() * n), n - 1)


def shuffle(rng: random.Random, values: list) -> None:
    """Fisher-Yates, in place."""
    for i in range(len(values) - 1, 0, -1):
        j = below(rng, i + 1)
        values[i], values[j] = values[j], values[i]


def sample(rng: random.Random, values: Sequence[T], k: int) -> list[T]:
    """k distinct elements, each subset equally likely (partial Fisher-Yates)."""
    pool = list(values)
    for i in range(k):
        j = i + below(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def weighted_order(rng: random.Random, weights: Sequence[float]) -> list[int]:
    """Indices of `weights` in the order of successive weighted draws without replacement (each
    next one picked with probability proportional to its weight among those left), by
    Efraimidis-Spirakis keys log(1 - u) / weight in O(n log n). Weight 0 comes after every
    positive weight, in random order. (NumPy only divides and sorts, which are exact.)"""
    draws = [rng.random() for _ in weights]
    logs = np.fromiter(map(math.log1p, map(operator.neg, draws)), float, len(draws))
    weight = np.asarray(weights, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        keys = np.where(weight > 0, logs / np.where(weight > 0, weight, 1.0), -np.inf)
    return np.lexsort((np.asarray(draws), keys))[::-1].tolist()


def weighted_indices(rng: random.Random, weights: Sequence[float], k: int) -> list[int]:
    """k distinct indices of `weights` drawn one after the other with probability proportional
    to weight; equal weights take the (exact) uniform path."""
    if len(set(weights)) <= 1:
        return sample(rng, range(len(weights)), k)
    return weighted_order(rng, weights)[:k]


def weighted_sample(
    rng: random.Random, values: Sequence[T], weights: Sequence[float], k: int
) -> list[T]:
    """k distinct elements drawn one after the other with probability proportional to weight;
    equal weights take the (cheaper, exact) uniform path."""
    return [values[i] for i in weighted_indices(rng, weights, k)]
