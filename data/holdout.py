"""Images set aside for evaluation: held out of training, or chosen among the trained ones, and
the fixed batches they are evaluated in.

As EveryDream2 (``data/every_dream_validation.py``), a split takes ``max(1, ceil(p × n))`` of the
``n`` candidate images, drawn from the path-sorted list with a generator of its own seed, so the
same files and seed give the same split on every machine and every resume. Images with
``multiply: 0`` are never trained and are not candidates (a user left them out).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from data.buckets import Size
from data.dataset import TrainDataset
from data.draws import generator, sample
from data.plan import BatchPlan, PlanItem
from data.scan import ImageRecord


def split(
    records: Sequence[ImageRecord], proportion: float, seed: int, stream: str
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(chosen, the others): ``max(1, ceil(proportion × n))`` of the ``n`` images with multiply
    > 0, drawn by ``seed`` and ``stream``; both lists keep the records' order."""
    assert 0.0 < proportion <= 1.0
    candidates = sorted((r for r in records if r.multiply > 0), key=lambda r: str(r.path))
    if not candidates:
        return [], list(records)
    count = min(len(candidates), max(1, math.ceil(proportion * len(candidates))))
    picked = {id(r) for r in sample(generator(seed, 0, stream), candidates, count)}
    chosen = [r for r in records if id(r) in picked]
    return chosen, [r for r in records if id(r) not in picked]


def renumbered(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The records with ``index`` = their position (what a dataset's images must have)."""
    return [dataclasses.replace(record, index=i) for i, record in enumerate(records)]


def without(dataset: TrainDataset, removed: Sequence[ImageRecord]) -> TrainDataset:
    """The dataset without ``removed`` (renumbered; same settings, skipped list and
    transforms): its plans, step counts and fingerprint count only the images left."""
    gone = {record.index for record in removed}
    kept = renumbered([r for r in dataset.images if r.index not in gone])
    return TrainDataset(dataset.settings, kept, dataset.skipped, dataset.transforms)


def for_evaluation(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The records as they are evaluated: each once (multiply 1), never flipped, the whole
    caption (no tag shuffling, no conditional dropout), unweighted, in the common pool;
    renumbered. Images with multiply 0 are left out."""
    plain = {
        "multiply": 1.0,
        "flip_p": 0.0,
        "cond_dropout": 0.0,
        "loss_scale": 1.0,
        "shuffle_tags": False,
        "batch_id": None,
    }
    return renumbered([dataclasses.replace(r, **plain) for r in records if r.multiply > 0])


def fixed_batches(records: Sequence[ImageRecord], batch_size: int) -> list[BatchPlan]:
    """Every record exactly once, in batches of up to ``batch_size`` images of one bucket
    (buckets tallest to widest, images in index order; a bucket's last batch may be short).
    The same records always give the same batches."""
    members: dict[Size, list[ImageRecord]] = {}
    for record in records:
        members.setdefault(record.bucket, []).append(record)
    plans: list[BatchPlan] = []
    for bucket in sorted(members, key=lambda b: (b[0] / b[1], b)):
        group = members[bucket]
        for start in range(0, len(group), batch_size):
            items = tuple(
                PlanItem.of(r, r.caption, flipped=False) for r in group[start : start + batch_size]
            )
            plans.append(BatchPlan(index=len(plans), bucket=bucket, items=items))
    return plans
