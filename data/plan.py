"""The epoch plan: which images go into which batch, in which order, flipped or not, with which
caption, dropped or not. Every random choice about the data is made here (and in
`data.epochs`), from generators seeded by (seed, epoch) alone (`data.draws`), so a plan is a
pure function of the dataset, the settings and the epoch: a resumed run sees exactly the data it
would have seen, and the data never touches the global RNG state of Python, NumPy or torch.

Caption transforms (plugins) are not part of the plan: they run where the data is loaded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from data.buckets import Size, crop_offset
from data.captions import render_caption
from data.draws import generator, shuffle
from data.epochs import COMMON_POOL, RatedSchedule, epoch_images, group_slots
from data.scan import ImageRecord
from data.settings import DataSettings


@dataclass(frozen=True)
class PlanItem:
    """One image slot of a batch. `image_index` indexes `TrainDataset.images`; together with
    `flipped` it identifies the pixels exactly (what a latent cache keys on). `caption` is the
    caption before caption transforms and before dropout: with `dropped` the image is trained
    with the empty caption (`data.transforms.trained_caption`). `original_size` is the image's
    ``(width, height)`` before resizing and `crop` the ``(left, top)`` pixels its bucket's crop
    cut off (`data.buckets.crop_offset`): SDXL's size conditioning, written to the schedule."""

    image_index: int
    path: str
    caption: str
    flipped: bool
    loss_scale: float = 1.0
    dropped: bool = False
    original_size: Size = field(kw_only=True)
    crop: Size = field(kw_only=True)

    @classmethod
    def of(
        cls,
        image: ImageRecord,
        caption: str,
        flipped: bool,
        loss_scale: float = 1.0,
        dropped: bool = False,
    ) -> PlanItem:
        """The slot of ``image`` in its own bucket."""
        return cls(
            image.index,
            str(image.path),
            caption,
            flipped,
            loss_scale,
            dropped,
            original_size=image.size,
            crop=crop_offset(image.size, image.bucket, flipped),
        )


@dataclass(frozen=True)
class BatchPlan:
    """One batch for one process: `index` is its position in this process's epoch."""

    index: int
    bucket: Size
    items: tuple[PlanItem, ...]


Slots = tuple[Size, list[ImageRecord]]  # one global batch: its bucket and images


def _cut(bucket: Size, members: list[ImageRecord], size: int) -> list[Slots]:
    return [(bucket, members[start : start + size]) for start in range(0, len(members), size)]


def _windows(
    rng: random.Random, named: dict[str, list[Slots]], common: list[Slots], accum: int
) -> list[Slots]:
    """Batches in training order when some images have a batch_id: the batches of one batch_id
    fill whole gradient-accumulation windows of `accum` batches where they can (EveryDream2's
    first-fit), short ones are topped up with common batches; windows are then shuffled, a
    short last window stays last (accumulation windows restart each epoch)."""
    windows: list[list[Slots]] = []
    partial: list[list[Slots]] = []
    for batch_id in sorted(named):
        batches = named[batch_id]
        shuffle(rng, batches)
        for start in range(0, len(batches), accum):
            chunk = batches[start : start + accum]
            (windows if len(chunk) == accum else partial).append(chunk)
    shuffle(rng, common)
    used = 0  # common batches used to top up short windows
    stream: list[Slots] = []
    for chunk in sorted(partial, key=len, reverse=True):
        topping = common[used : used + accum - len(chunk)]
        used += len(topping)
        if len(chunk) + len(topping) == accum:
            windows.append(chunk + topping)
        else:
            stream.extend(chunk + topping)
    stream.extend(common[used:])
    last: list[Slots] = []
    for start in range(0, len(stream), accum):
        chunk = stream[start : start + accum]
        if len(chunk) == accum:
            windows.append(chunk)
        else:
            last = chunk
    shuffle(rng, windows)
    return [batch for window in windows for batch in window] + last


def global_batches(
    images: Sequence[ImageRecord], settings: DataSettings, epoch: int, grad_accum: int
) -> list[Slots]:
    """The epoch's global batches of batch_size × world_size images, each from one bucket, in
    training order.

    Images of a batch_id are batched only with each other; the leftovers that do not fill a
    whole batch join the common pool of their bucket (as EveryDream2 does). A pool whose slots
    do not fill whole batches is topped up by repeating its own (shuffled) slots from the
    start, so no image is dropped.
    """
    group_size = settings.batch_size * settings.world_size
    rated = (
        RatedSchedule(settings.max_epochs, settings.rated_dataset_target_dropout_percent)
        if settings.rated_dataset
        else None
    )
    chosen = epoch_images(images, settings.seed, epoch, rated)
    rng = generator(settings.seed, epoch, "order")
    named: dict[str, list[Slots]] = {}
    pools: dict[Size, list[ImageRecord]] = {}
    for (batch_id, bucket), members in group_slots(chosen, settings.seed, epoch).items():
        shuffle(rng, members)
        full = 0 if batch_id == COMMON_POOL else len(members) - len(members) % group_size
        if full:
            named.setdefault(batch_id, []).extend(_cut(bucket, members[:full], group_size))
        pools.setdefault(bucket, []).extend(members[full:])
    common: list[Slots] = []
    for bucket in sorted(pools):
        members = pools[bucket]
        if not members:
            continue
        if named:
            shuffle(rng, members)
        count = len(members)
        members.extend(members[i % count] for i in range(-count % group_size))
        common.extend(_cut(bucket, members, group_size))
    if not named:
        shuffle(rng, common)
        return common
    return _windows(rng, named, common, grad_accum)


def build_plan(
    images: Sequence[ImageRecord], settings: DataSettings, epoch: int, grad_accum: int
) -> list[BatchPlan]:
    """This process's batches for `epoch`, accumulated in windows of `grad_accum` batches
    (which shapes the plan only when images have a batch_id).

    All processes build the same global plan of batches of batch_size × world_size images (one
    bucket each) and process `rank` takes images rank×batch_size .. (rank+1)×batch_size-1 of
    every global batch. So every process runs the same number of steps, each of its batches is
    from one bucket, and the images of one step over all processes are exactly the batch a
    single process with batch_size × world_size would train on.

    Flips, conditional dropout and tag shuffles are drawn per slot from a second generator, in
    plan order, so changing flip_p or cond_dropout does not change which images are batched
    together.
    """
    size, rank = settings.batch_size, settings.rank
    augment = generator(settings.seed, epoch, "augment")
    plans: list[BatchPlan] = []
    for index, (bucket, slots) in enumerate(global_batches(images, settings, epoch, grad_accum)):
        items: list[PlanItem] = []
        for image in slots:
            flipped = augment.random() < image.flip_p
            dropped = augment.random() < image.cond_dropout
            caption = image.caption
            if image.shuffle_tags:
                caption = render_caption(
                    image.parts,
                    image.weights,
                    augment,
                    settings.keep_tags,
                    image.max_caption_length,
                )
            items.append(PlanItem.of(image, caption, flipped, image.loss_scale, dropped))
        mine = items[rank * size : (rank + 1) * size]
        plans.append(BatchPlan(index=index, bucket=bucket, items=tuple(mine)))
    return plans
