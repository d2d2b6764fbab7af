"""Epoch plans: batches, determinism, multiply, augment draws, tag shuffling, ranks, schedule."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import torch

from data import TrainDataset
from tests.data_fixtures import load, write_image


def _mixed_dataset(root, squares=5, wides=3, talls=2):
    for k in range(squares):
        write_image(root / f"square {k}_.png", size=(40, 40))
    for k in range(wides):
        write_image(root / f"wide {k}_.png", size=(80, 40))
    for k in range(talls):
        write_image(root / f"tall {k}_.png", size=(40, 80))


def _indices(batches):
    return [[item.image_index for item in batch.items] for batch in batches]


def _flat(dataset: TrainDataset, epoch: int) -> list[int]:
    return [i for batch in _indices(dataset.epoch_batches(epoch)) for i in batch]


def test_batches_hold_one_bucket_and_short_buckets_repeat_their_own_images(tmp_path):
    _mixed_dataset(tmp_path)
    dataset = load(tmp_path, batch_size=4)
    batches = dataset.epoch_batches(0)
    # 5 squares → 2 batches, 3 wides → 1, 2 talls → 1
    assert len(batches) == dataset.batches_per_epoch() == 4
    assert [b.index for b in batches] == [0, 1, 2, 3]
    for batch in batches:
        assert len(batch.items) == 4
        assert {dataset.images[item.image_index].bucket for item in batch.items} == {batch.bucket}
    used = Counter(_flat(dataset, 0))
    assert set(used) == set(range(len(dataset.images)))  # no image dropped
    by_bucket: dict = {}
    for image in dataset.images:
        by_bucket.setdefault(image.bucket, []).append(used[image.index])
    # fill-ups repeat images of the short bucket only, each at most once more
    assert sorted(by_bucket[(64, 64)]) == [1, 1, 2, 2, 2]
    assert sorted(by_bucket[(80, 48)]) == [1, 1, 2]
    assert sorted(by_bucket[(48, 80)]) == [2, 2]


def test_a_bucket_smaller_than_a_batch_repeats_until_full(tmp_path):
    write_image(tmp_path / "only.png")
    [batch] = load(tmp_path, batch_size=5).epoch_batches(0)
    assert [item.image_index for item in batch.items] == [0] * 5


def test_same_seed_same_batches_other_epoch_or_seed_differs(tmp_path):
    _mixed_dataset(tmp_path, squares=12, wides=8, talls=6)
    first = load(tmp_path, seed=3, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    again = load(tmp_path, seed=3, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    assert first.epoch_batches(4) == again.epoch_batches(4)
    assert first.epoch_batches(4) != first.epoch_batches(5)
    other_seed = load(tmp_path, seed=4, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    assert first.epoch_batches(4) != other_seed.epoch_batches(4)


def test_plan_leaves_global_random_state_alone(tmp_path):
    _mixed_dataset(tmp_path)
    dataset = load(tmp_path, flip_p=0.5, cond_dropout=0.5, shuffle_tags=True)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    dataset.epoch_batches(0)
    dataset.epoch_batches(1)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_flip_and_dropout_do_not_change_the_batch_order(tmp_path):
    _mixed_dataset(tmp_path)
    plain = load(tmp_path)
    augmented = load(tmp_path, flip_p=0.5, cond_dropout=0.5)
    assert _indices(plain.epoch_batches(2)) == _indices(augmented.epoch_batches(2))


def test_flip_and_dropout_draws(tmp_path):
    _mixed_dataset(tmp_path, squares=20, wides=0, talls=0)
    never = load(tmp_path, flip_p=0.0, cond_dropout=0.0)
    items = [item for batch in never.epoch_batches(0) for item in batch.items]
    assert not any(item.flipped or item.dropped for item in items)
    always = load(tmp_path, flip_p=1.0, cond_dropout=1.0)
    items = [item for batch in always.epoch_batches(0) for item in batch.items]
    assert all(item.flipped and item.dropped for item in items)
    assert all(item.caption for item in items)  # the caption before dropout is kept
    half = load(tmp_path, flip_p=0.5, cond_dropout=0.5)
    items = [item for epoch in range(10) for b in half.epoch_batches(epoch) for item in b.items]
    flips = sum(item.flipped for item in items) / len(items)
    drops = sum(item.dropped for item in items) / len(items)
    assert 0.35 < flips < 0.65 and 0.35 < drops < 0.65


def test_per_image_flip_and_dropout_from_folder_files(tmp_path):
    write_image(tmp_path / "normal.png")
    write_image(tmp_path / "flipped" / "x.png")
    (tmp_path / "flipped" / "flip_p.txt").write_text("1", "utf-8")
    write_image(tmp_path / "dropped" / "y.png")
    (tmp_path / "dropped" / "cond_dropout.txt").write_text("1", "utf-8")
    dataset = load(tmp_path, batch_size=1)
    items = {
        item.path.rsplit("/", 1)[-1]: item for b in dataset.epoch_batches(0) for item in b.items
    }
    assert (items["normal.png"].flipped, items["normal.png"].dropped) == (False, False)
    assert (items["x.png"].flipped, items["x.png"].dropped) == (True, False)
    assert (items["y.png"].flipped, items["y.png"].dropped) == (False, True)


def test_whole_multiply_repeats_and_zero_leaves_out(tmp_path):
    write_image(tmp_path / "once.png")
    write_image(tmp_path / "twice" / "a.png")
    (tmp_path / "twice" / "multiply.txt").write_text("2", "utf-8")
    write_image(tmp_path / "never" / "b.png")
    (tmp_path / "never" / "multiply.txt").write_text("0", "utf-8")
    dataset = load(tmp_path, batch_size=1)
    names = {image.index: image.path.name for image in dataset.images}
    used = Counter(names[i] for i in _flat(dataset, 0))
    assert used == {"once.png": 1, "a.png": 2}
    assert dataset.batches_per_epoch() == 3
    assert dataset.summary()["images"] == 3  # b.png is an image of the dataset, used 0 times


def test_fractional_multiply_draws_a_fixed_number_anew_each_epoch(tmp_path):
    for k in range(6):
        write_image(tmp_path / f"img{k}.png")
    (tmp_path / "multiply.txt").write_text("1.5", "utf-8")
    dataset = load(tmp_path, batch_size=1)
    assert dataset.batches_per_epoch() == 9
    extras = []
    for epoch in range(8):
        used = Counter(_flat(dataset, epoch))
        assert set(used) == set(range(6))  # every image at least once
        assert sorted(used.values()) == [1, 1, 1, 2, 2, 2]  # plus half of them once more
        extras.append(frozenset(i for i, n in used.items() if n == 2))
    assert len(set(extras)) > 1  # drawn anew


def test_steps_per_epoch_matches_every_epoch_with_fractions(tmp_path):
    _mixed_dataset(tmp_path)
    (tmp_path / "multiply.txt").write_text("1.3", "utf-8")
    dataset = load(tmp_path, batch_size=3)
    for epoch in range(5):
        assert len(dataset.epoch_batches(epoch)) == dataset.batches_per_epoch()


def test_shuffle_tags_keeps_the_first_part(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("main, a, b, c, d, e", "utf-8")
    plain = load(tmp_path, batch_size=1)
    assert {plain.epoch_batches(e)[0].items[0].caption for e in range(5)} == {"main, a, b, c, d, e"}
    shuffled = load(tmp_path, batch_size=1, shuffle_tags=True)
    captions = [shuffled.epoch_batches(e)[0].items[0].caption for e in range(20)]
    assert len(set(captions)) > 5
    for caption in captions:
        parts = caption.split(", ")
        assert parts[0] == "main" and sorted(parts[1:]) == ["a", "b", "c", "d", "e"]
    # keep_tags counts tags after the main prompt (EveryDream2's documented meaning)
    kept = load(tmp_path, batch_size=1, shuffle_tags=True, keep_tags=2)
    captions = [kept.epoch_batches(e)[0].items[0].caption for e in range(20)]
    assert all(caption.startswith("main, a, b, ") for caption in captions)
    assert len(set(captions)) > 2


def test_weighted_tags_come_first_more_often(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "x.yaml").write_text(
        "main_prompt: main\ntags:\n  - light\n  - tag: heavy\n    weight: 5\n  - other\n", "utf-8"
    )
    dataset = load(tmp_path, batch_size=1, shuffle_tags=True)
    firsts = Counter(
        dataset.epoch_batches(e)[0].items[0].caption.split(", ")[1] for e in range(200)
    )
    assert firsts["heavy"] > firsts["light"] + firsts["other"]


def test_two_ranks_split_every_global_batch(tmp_path):
    _mixed_dataset(tmp_path, squares=7, wides=5, talls=3)
    options = {"flip_p": 0.5, "cond_dropout": 0.2, "shuffle_tags": True}
    rank0 = load(tmp_path, batch_size=2, rank=0, world_size=2, **options)
    rank1 = load(tmp_path, batch_size=2, rank=1, world_size=2, **options)
    single = load(tmp_path, batch_size=4, **options)
    assert rank0.batches_per_epoch() == rank1.batches_per_epoch() == single.batches_per_epoch()
    for epoch in range(3):
        a, b, whole = (
            rank0.epoch_batches(epoch),
            rank1.epoch_batches(epoch),
            single.epoch_batches(epoch),
        )
        assert len(a) == len(b) == len(whole) == rank0.batches_per_epoch()
        for x, y, w in zip(a, b, whole, strict=True):
            assert x.bucket == y.bucket == w.bucket
            assert len(x.items) == len(y.items) == 2
            assert x.items + y.items == w.items  # the union is the single-process batch
        slots_a = [(b.index, k) for b in a for k in range(len(b.items))]
        assert len(set(slots_a)) == len(slots_a)


def test_ranks_take_disjoint_images_when_no_bucket_needs_filling(tmp_path):
    _mixed_dataset(tmp_path, squares=8, wides=4, talls=4)
    ranks = [load(tmp_path, batch_size=2, rank=r, world_size=2) for r in range(2)]
    seen = [set(_flat(dataset, 1)) for dataset in ranks]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(16))


def test_write_schedule_matches_the_plan(tmp_path):
    _mixed_dataset(tmp_path / "data")
    dataset = load(tmp_path / "data", flip_p=0.5)
    path = tmp_path / "logs" / "schedule_epoch2.json"
    dataset.write_schedule(2, path)
    document = json.loads(path.read_text("utf-8"))
    batches = dataset.epoch_batches(2)
    assert document["epoch"] == 2 and document["steps"] == len(batches)
    for written, batch in zip(document["batches"], batches, strict=True):
        assert written["bucket"] == f"{batch.bucket[0]}x{batch.bucket[1]}"
        assert [(i["path"], i["caption"], i["flipped"]) for i in written["images"]] == [
            (item.path, item.caption, item.flipped) for item in batch.items
        ]


def test_fingerprint_changes_with_the_data(tmp_path):
    _mixed_dataset(tmp_path)
    before = load(tmp_path).fingerprint()
    assert load(tmp_path).fingerprint() == before
    (tmp_path / "square 0_.txt").write_text("a new caption", "utf-8")
    assert load(tmp_path).fingerprint() != before
