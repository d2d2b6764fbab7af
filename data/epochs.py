"""Which images an epoch uses and how often: `multiply` (whole and fractional) and rated
datasets, and how many batches that makes.

- Whole multiplies repeat an image. Fractions are rounded as EveryDream2 rounds them: an epoch
  has floor(sum of all multiplies) image slots. The extra slots (beyond the whole parts) are
  given to the groups of images (same batch_id and bucket) in proportion to their fractions
  (largest remainder, so the count per group is the same every epoch), and within a group drawn
  anew each epoch, an image's chance in proportion to its fraction.
- Rated datasets (EveryDream2's `rated_dataset`): epoch e keeps ceil(N × f(e)) of the N images
  (multiply > 0), drawn one after the other with chance proportional to `rating`, where
  f(0) = 1 and f(e) = (max_epochs − (e − 1) × t) / max_epochs with
  t = 1 − rated_dataset_target_dropout_percent / 100 (EveryDream2's formula: its epoch e uses
  the fraction computed at the end of epoch e − 1). The kept images keep their multiply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from data.buckets import Size
from data.draws import generator, weighted_indices, weighted_sample
from data.scan import ImageRecord

COMMON_POOL = ""  # the batch_id of images without one (a real batch_id is never empty)

Group = tuple[str, Size]  # (batch_id or COMMON_POOL, bucket)


@dataclass(frozen=True)
class RatedSchedule:
    """EveryDream2's rated dataset settings."""

    max_epochs: int
    target_dropout_percent: int

    def kept_fraction(self, epoch: int) -> float:
        """The fraction of the images that epoch `epoch` (0-based) keeps."""
        if epoch == 0:
            return 1.0
        target = 1.0 - (self.target_dropout_percent / 100.0)
        return (self.max_epochs - ((epoch - 1) * target)) / self.max_epochs


def epoch_images(
    images: Sequence[ImageRecord], seed: int, epoch: int, rated: RatedSchedule | None
) -> list[ImageRecord]:
    """The images epoch `epoch` uses (in index order): all with multiply > 0, or a rated
    dataset's draw for the epoch."""
    eligible = [image for image in images if image.multiply > 0]
    fraction = 1.0 if rated is None else rated.kept_fraction(epoch)
    if fraction >= 1.0:
        return eligible
    keep = min(max(math.ceil(len(eligible) * fraction), 0), len(eligible))
    rng = generator(seed, epoch, "rated")
    chosen = weighted_indices(rng, [image.rating for image in eligible], keep)
    return [eligible[i] for i in sorted(chosen)]


def _group(image: ImageRecord) -> Group:
    return (image.batch_id if image.batch_id is not None else COMMON_POOL, image.bucket)


def _fraction(image: ImageRecord) -> float:
    return image.multiply - int(image.multiply)  # multiply >= 0: int() is floor()


def _extra_slots(fractions: dict[Group, list[float]]) -> dict[Group, int]:
    """Slots for fractional multiplies per group: floor(sum of all fractions) in all, shared by
    largest remainder (ties: group order). `math.fsum` is exact, so the result does not depend
    on the order of the images."""
    sums = {key: math.fsum(values) for key, values in sorted(fractions.items())}
    total = math.floor(math.fsum(sums.values()))
    extra = {key: math.floor(value) for key, value in sums.items()}
    left = total - sum(extra.values())
    by_remainder = sorted(
        (key for key in sums if sums[key] > extra[key]), key=lambda k: extra[k] - sums[k]
    )
    for key in by_remainder[: max(0, left)]:
        extra[key] += 1
    return extra


def slot_counts(images: Sequence[ImageRecord]) -> dict[Group, int]:
    """Image slots per group of one epoch using `images` (what `group_slots` gives, counted)."""
    counts: dict[Group, int] = {}
    fractions: dict[Group, list[float]] = {}
    for image in images:
        key = _group(image)
        whole = int(image.multiply)
        counts[key] = counts.get(key, 0) + whole
        if image.multiply != whole:
            fractions.setdefault(key, []).append(image.multiply - whole)
    for key, extra in _extra_slots(fractions).items():
        counts[key] += extra
    return dict(sorted(counts.items()))


def group_slots(
    images: Sequence[ImageRecord], seed: int, epoch: int
) -> dict[Group, list[ImageRecord]]:
    """Image slots per group of one epoch (not shuffled): each image floor(multiply) times plus
    the group's fractional draws, made anew each epoch; groups sorted."""
    rng = generator(seed, epoch, "multiply")
    groups: dict[Group, list[ImageRecord]] = {}
    for image in images:
        groups.setdefault(_group(image), []).append(image)
    partial = {
        key: [image for image in members if _fraction(image) > 0]
        for key, members in sorted(groups.items())
    }
    extra = _extra_slots({key: [_fraction(i) for i in members] for key, members in partial.items()})
    slots: dict[Group, list[ImageRecord]] = {}
    for key, members in partial.items():
        whole = [image for image in groups[key] for _ in range(int(image.multiply))]
        drawn = weighted_sample(rng, members, [_fraction(i) for i in members], extra.get(key, 0))
        if whole or drawn:
            slots[key] = whole + drawn
    return slots


def batch_count(counts: dict[Group, int], group_size: int) -> int:
    """Global batches of one epoch: full batches of each batch_id, then its leftover images
    join the common pool of their bucket, which is filled up to whole batches."""
    pools: dict[Size, int] = {}
    batches = 0
    for (batch_id, bucket), count in counts.items():
        if batch_id != COMMON_POOL:
            batches += count // group_size
            count %= group_size
        pools[bucket] = pools.get(bucket, 0) + count
    return batches + sum(math.ceil(count / group_size) for count in pools.values())
