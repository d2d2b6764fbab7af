"""The epoch plan: which images go into which batch, in which order, flipped or not, with which
caption. Every random choice about the data is made here, from generators seeded by
(seed, epoch) alone, so a plan is a pure function of the dataset, the settings and the epoch:
a resumed run sees exactly the data it would have seen, and the data never touches the global
RNG state of Python, NumPy or torch.

Only `random.Random.random()` is used (its sequence for a given integer seed is guaranteed
across Python versions; `shuffle`/`sample` are not), with hand-written Fisher-Yates on top.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from data.buckets import Size
from data.scan import ImageRecord


@dataclass(frozen=True)
class PlanItem:
    """One image slot of a batch. `image_index` indexes `TrainDataset.images`; together with
    `flipped` it identifies the pixels exactly (what a latent cache keys on)."""

    image_index: int
    path: str
    caption: str
    flipped: bool
    loss_scale: float = 1.0


@dataclass(frozen=True)
class BatchPlan:
    """One batch for one process: `step` is its position in this process's epoch."""

    step: int
    bucket: Size
    items: tuple[PlanItem, ...]


def _generator(seed: int, epoch: int, stream: str) -> random.Random:
    digest = hashlib.sha256(f"dreamtrainer-data:{stream}:{seed}:{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _below(rng: random.Random, n: int) -> int:
    """A uniform integer in 0..n-1 from `random()` only."""
    return min(int(rng.random() * n), n - 1)


def _shuffle(rng: random.Random, values: list) -> None:
    for i in range(len(values) - 1, 0, -1):
        j = _below(rng, i + 1)
        values[i], values[j] = values[j], values[i]


def _sample(rng: random.Random, values: Sequence, k: int) -> list:
    """k distinct elements (partial Fisher-Yates)."""
    pool = list(values)
    for i in range(k):
        j = i + _below(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def fractional_count(multiply: float, count: int) -> int:
    """How many of `count` images with this `multiply` get an extra draw each epoch:
    the fractional part × count, rounded half up (1.5 on 3 images → 2 extra)."""
    return math.floor((multiply - math.floor(multiply)) * count + 0.5)


def slots_per_bucket(images: Sequence[ImageRecord]) -> dict[Size, int]:
    """Image slots of one epoch in each bucket, before filling up short batches. The same every
    epoch: fractional multiplies draw a fixed number of images per (bucket, multiply) group."""
    groups: dict[tuple[Size, float], int] = {}
    for image in images:
        key = (image.bucket, image.multiply)
        groups[key] = groups.get(key, 0) + 1
    slots: dict[Size, int] = {}
    for (bucket, multiply), count in sorted(groups.items()):
        extra = math.floor(multiply) * count + fractional_count(multiply, count)
        slots[bucket] = slots.get(bucket, 0) + extra
    return {bucket: count for bucket, count in slots.items() if count > 0}


def global_batch_count(images: Sequence[ImageRecord], group_size: int) -> int:
    """Global batches (optimizer steps of all processes together) per epoch."""
    return sum(math.ceil(count / group_size) for count in slots_per_bucket(images).values())


def _bucket_slots(rng: random.Random, members: list[ImageRecord]) -> list[ImageRecord]:
    """One epoch's image slots of one bucket, shuffled: each image floor(multiply) times, plus
    the fractional draws."""
    slots: list[ImageRecord] = []
    by_multiply: dict[float, list[ImageRecord]] = {}
    for image in members:
        slots.extend([image] * math.floor(image.multiply))
        by_multiply.setdefault(image.multiply, []).append(image)
    for multiply in sorted(by_multiply):
        group = by_multiply[multiply]
        slots.extend(_sample(rng, group, fractional_count(multiply, len(group))))
    _shuffle(rng, slots)
    return slots


def _global_batches(
    images: Sequence[ImageRecord], seed: int, epoch: int, group_size: int
) -> list[tuple[Size, list[ImageRecord]]]:
    """The epoch's global batches of `group_size` images, each from one bucket, in training
    order. A bucket whose slots do not fill whole batches is topped up by repeating its own
    (shuffled) slots from the start, so no image is dropped."""
    rng = _generator(seed, epoch, "order")
    members: dict[Size, list[ImageRecord]] = {}
    for image in images:
        members.setdefault(image.bucket, []).append(image)
    batches: list[tuple[Size, list[ImageRecord]]] = []
    for bucket in sorted(members):
        slots = _bucket_slots(rng, members[bucket])
        if not slots:
            continue
        missing = -len(slots) % group_size
        slots.extend(slots[i % len(slots)] for i in range(missing))
        for start in range(0, len(slots), group_size):
            batches.append((bucket, slots[start : start + group_size]))
    _shuffle(rng, batches)
    return batches


def render_caption(
    image: ImageRecord, rng: random.Random, shuffle_tags: bool, keep_tags: int
) -> str:
    """The caption as trained this time: with `shuffle_tags`, the parts after the first
    max(1, keep_tags) are shuffled (a weighted shuffle when yaml weights differ: heavier tags
    tend to come first)."""
    if not shuffle_tags:
        return image.caption
    keep = max(1, keep_tags)
    fixed, rest = list(image.parts[:keep]), list(image.parts[keep:])
    weights = image.weights[keep:]
    if len(set(weights)) > 1:
        keys = [rng.random() ** (1.0 / weight) for weight in weights]
        order = sorted(range(len(rest)), key=lambda i: keys[i], reverse=True)
        rest = [rest[i] for i in order]
    else:
        _shuffle(rng, rest)
    return ", ".join(part for part in fixed + rest if part)


def build_plan(
    images: Sequence[ImageRecord],
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle_tags: bool,
    keep_tags: int,
) -> list[BatchPlan]:
    """This process's batches for `epoch`.

    All processes build the same global plan of batches of batch_size × world_size images (one
    bucket each) and process `rank` takes images rank×batch_size .. (rank+1)×batch_size-1 of
    every global batch. So every process runs the same number of steps, each of its batches is
    from one bucket, and the images of one step over all processes are exactly the batch a
    single process with batch_size × world_size would train on.

    Flips, conditional dropout (caption "") and tag shuffles are drawn per slot from a second
    generator, in plan order, so changing flip_p or cond_dropout does not change which images
    are batched together.
    """
    group_size = batch_size * world_size
    augment = _generator(seed, epoch, "augment")
    plans: list[BatchPlan] = []
    for step, (bucket, slots) in enumerate(_global_batches(images, seed, epoch, group_size)):
        items: list[PlanItem] = []
        for image in slots:
            flipped = augment.random() < image.flip_p
            dropped = augment.random() < image.cond_dropout
            caption = render_caption(image, augment, shuffle_tags, keep_tags)
            items.append(
                PlanItem(image.index, str(image.path), "" if dropped else caption, flipped)
            )
        mine = items[rank * batch_size : (rank + 1) * batch_size]
        plans.append(BatchPlan(step=step, bucket=bucket, items=tuple(mine)))
    return plans
