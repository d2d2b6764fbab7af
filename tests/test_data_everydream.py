"""EveryDream2's folder files and yaml keys (issue 12): batch_id, loss_scale, shuffle_tags,
fractional multiply rounding, rated datasets, max_caption_length, and the fingerprint."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from data import make_loader
from tests.data_fixtures import load, record, write_image


def _names(dataset, batch) -> list[str]:
    return [dataset.images[item.image_index].path.parent.name for item in batch.items]


def _used(dataset, epoch) -> Counter:
    return Counter(item.image_index for b in dataset.epoch_batches(epoch) for item in b.items)


def _horses_and_others(root, horses=5, others=7, wide_horse=True):
    for k in range(horses - wide_horse):
        write_image(root / "horses" / f"horse{k}.png", size=(40, 40))
    if wide_horse:
        write_image(root / "horses" / "wide horse.png", size=(80, 40))
    (root / "horses" / "batch_id.txt").write_text("my_horses\n", "utf-8")
    for k in range(others):
        write_image(root / "others" / f"other{k}.png", size=(40, 40))
    write_image(root / "others" / "wide other.png", size=(80, 40))


def test_batch_id_images_are_batched_only_together_leftovers_join_the_pool(tmp_path):
    _horses_and_others(tmp_path)
    dataset = load(tmp_path, batch_size=2)
    assert {i.batch_id for i in dataset.images} == {"my_horses", None}
    # 4 square horses → 2 batches; the wide horse is a leftover: it joins the wide pool
    # (1 wide other + 1 wide horse → 1 batch); 7 square others → 4 batches
    assert dataset.batches_per_epoch() == 7
    assert dataset.summary()["batch_ids"] == {"my_horses": 5}
    for epoch in range(6):
        batches = dataset.epoch_batches(epoch)
        assert len(batches) == 7
        folders = [_names(dataset, batch) for batch in batches]
        square_horse_batches = [
            f
            for f, b in zip(folders, batches, strict=True)
            if b.bucket == (64, 64) and "horses" in f
        ]
        assert square_horse_batches == [["horses", "horses"]] * 2
        for batch in batches:
            assert len({dataset.images[i.image_index].bucket for i in batch.items}) == 1


def test_batch_id_from_yaml_and_nearest_wins(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    (tmp_path / "local.yaml").write_text("batch_id: folder\n", "utf-8")
    (tmp_path / "b.yaml").write_text("main_prompt: b\nbatch_id: 7\n", "utf-8")
    (tmp_path / "global.yaml").write_text("batch_id: everywhere\n", "utf-8")
    write_image(tmp_path / "sub" / "d.png")
    dataset = load(tmp_path)
    ids = {i.path.name: i.batch_id for i in dataset.images}
    # the image's yaml, then local.yaml (this folder only), then global.yaml (and below)
    assert ids == {"a.png": "folder", "b.png": "7", "c.png": "folder", "d.png": "everywhere"}


def test_batch_id_batches_share_accumulation_windows(tmp_path):
    for k in range(4):
        write_image(tmp_path / "horses" / f"h{k}.png")
    (tmp_path / "horses" / "batch_id.txt").write_text("horses", "utf-8")
    for k in range(7):
        write_image(tmp_path / "others" / f"o{k}.png")
    for seed in range(5):
        dataset = load(tmp_path, batch_size=1, seed=seed)
        for epoch in range(4):
            batches = dataset.epoch_batches(epoch, grad_accum=2)
            assert len(batches) == dataset.batches_per_epoch() == 11
            kinds = [_names(dataset, batch)[0] for batch in batches]
            windows = [kinds[k : k + 2] for k in range(0, 10, 2)]
            # 4 horse batches fill 2 whole windows of 2; the odd others batch is last
            assert windows.count(["horses", "horses"]) == 2
            assert all(w in (["horses", "horses"], ["others", "others"]) for w in windows)
            assert kinds[10] == "others"


@pytest.mark.parametrize("workers", [0, 1])
def test_loss_scale_reaches_the_batch(tmp_path, workers):
    write_image(tmp_path / "plain.png")
    write_image(tmp_path / "half" / "x.png")
    (tmp_path / "half" / "loss_scale.txt").write_text("0.5", "utf-8")
    write_image(tmp_path / "half" / "own.png")
    (tmp_path / "half" / "own.yaml").write_text("main_prompt: own\nloss_scale: 2\n", "utf-8")
    (tmp_path / "global.yaml").write_text("loss_scale: 3\n", "utf-8")
    write_image(tmp_path / "sub" / "deep.png")
    dataset = load(tmp_path, batch_size=2, dataloader_num_workers=workers)
    expected = {"plain.png": 3.0, "x.png": 0.5, "own.png": 2.0, "deep.png": 3.0}
    assert {i.path.name: i.loss_scale for i in dataset.images} == expected
    seen = {}
    for batch in make_loader(dataset, 0):
        assert len(batch.loss_scales) == len(batch.paths) == 2
        for path, scale in zip(batch.paths, batch.loss_scales, strict=True):
            seen[path.rsplit("/", 1)[-1]] = scale
    assert seen == expected
    cached = list(dataset.batches_without_pixels(0, 0, 1))
    assert [b.loss_scales for b in cached] == [b.loss_scales for b in make_loader(dataset, 0)]


def _captions(dataset, name, epochs=12) -> set[str]:
    return {
        item.caption
        for epoch in range(epochs)
        for batch in dataset.epoch_batches(epoch)
        for item in batch.items
        if item.path.endswith(name)
    }


@pytest.mark.parametrize(
    ("text", "shuffled"), [("", True), ("true\n", True), ("False", False), ("0", False)]
)
def test_shuffle_tags_txt_shuffles_that_folder(tmp_path, text, shuffled):
    write_image(tmp_path / "booru" / "x.png")
    (tmp_path / "booru" / "x.txt").write_text("main, a, b, c, d, e", "utf-8")
    (tmp_path / "booru" / "shuffle_tags.txt").write_text(text, "utf-8")
    write_image(tmp_path / "plain" / "y.png")
    (tmp_path / "plain" / "y.txt").write_text("main, a, b, c, d, e", "utf-8")
    dataset = load(tmp_path, batch_size=1)
    assert record(dataset, "x.png").shuffle_tags is shuffled
    captions = _captions(dataset, "x.png")
    if shuffled:
        assert len(captions) > 3
    else:
        assert captions == {"main, a, b, c, d, e"}
    assert _captions(dataset, "y.png") == {"main, a, b, c, d, e"}


def test_shuffle_tags_in_yaml_and_global_yaml_turn_it_on(tmp_path):
    (tmp_path / "global.yaml").write_text("shuffle_tags: true\n", "utf-8")
    write_image(tmp_path / "sub" / "x.png")
    (tmp_path / "sub" / "x.txt").write_text("main, a, b, c, d, e", "utf-8")
    write_image(tmp_path / "other" / "y.png")
    (tmp_path / "other" / "y.yaml").write_text(
        "main_prompt: main\ntags: [a, b, c, d, e]\nshuffle_tags: false\n", "utf-8"
    )
    dataset = load(tmp_path, batch_size=1)
    # EveryDream2: on when any file (or train.json) turns it on; `false` turns nothing off
    assert record(dataset, "x.png").shuffle_tags and record(dataset, "y.png").shuffle_tags
    assert len(_captions(dataset, "x.png")) > 3


def test_fractional_multiply_is_rounded_as_everydream2(tmp_path):
    # EveryDream2: an epoch has floor(sum of multiplies) images: 3 × 1.5 → 4 (not 5)
    for k in range(3):
        write_image(tmp_path / "a" / f"img{k}.png")
    (tmp_path / "a" / "multiply.txt").write_text("1.5", "utf-8")
    dataset = load(tmp_path, batch_size=1)
    assert dataset.images_per_epoch == 4 == dataset.batches_per_epoch()
    extra = set()
    for epoch in range(10):
        used = _used(dataset, epoch)
        assert sorted(used.values()) == [1, 1, 2]
        extra.add(next(i for i, n in used.items() if n == 2))
    assert len(extra) > 1  # drawn anew each epoch


def test_fractions_add_up_across_buckets_and_folders(tmp_path):
    # two buckets with 0.5 each: floor(1.0) = 1 extra slot in all, every epoch the same count
    write_image(tmp_path / "square" / "s.png", size=(40, 40))
    (tmp_path / "square" / "multiply.txt").write_text("0.5", "utf-8")
    write_image(tmp_path / "wide" / "w.png", size=(80, 40))
    (tmp_path / "wide" / "multiply.txt").write_text("0.5", "utf-8")
    for k in range(10):  # ten times 0.1 is 1 (an exact sum, not 0.9999999999999999)
        write_image(tmp_path / "tenth" / f"t{k}.png", size=(40, 40))
    (tmp_path / "tenth" / "multiply.txt").write_text("0.1", "utf-8")
    dataset = load(tmp_path, batch_size=1)
    assert dataset.images_per_epoch == 2 == math.floor(0.5 + 0.5 + 10 * 0.1)
    for epoch in range(5):
        assert len(dataset.epoch_batches(epoch)) == dataset.batches_per_epoch() == 2


def _rated_dataset(root, count=20):
    for k in range(count):
        write_image(root / "low" / f"l{k}.png")
        write_image(root / "high" / f"h{k}.png")
    (root / "low" / "local.yaml").write_text("rating: 1\n", "utf-8")
    (root / "high" / "local.yaml").write_text("rating: 10\n", "utf-8")


def test_rated_dataset_keeps_fewer_images_each_epoch_by_rating(tmp_path):
    _rated_dataset(tmp_path)
    options = {"batch_size": 1, "rated_dataset": True, "max_epochs": 10}
    dataset = load(tmp_path, rated_dataset_target_dropout_percent=50, **options)
    high_kept = low_kept = 0
    for epoch in range(10):
        # EveryDream2: epoch e keeps ceil(N × (M − (e − 1) × t) / M), t = 1 − 50/100
        fraction = 1.0 if epoch < 2 else (10 - (epoch - 1) * 0.5) / 10
        expected = math.ceil(40 * fraction)
        used = _used(dataset, epoch)
        assert set(used.values()) == {1} and len(used) == expected
        assert dataset.batches_in_epoch(epoch) == len(dataset.epoch_batches(epoch)) == expected
        names = [dataset.images[i].path.parent.name for i in used]
        high_kept += names.count("high")
        low_kept += names.count("low")
    assert high_kept > low_kept + 20  # higher ratings are kept more often
    assert dataset.batches_in_run() == sum(dataset.batches_in_epoch(e) for e in range(10)) == 328
    assert dataset.summary()["steps_by_epoch"][:3] == [40, 40, 38]
    again = load(tmp_path, rated_dataset_target_dropout_percent=50, **options)
    assert again.epoch_batches(7) == dataset.epoch_batches(7)
    with pytest.raises(AssertionError, match="batches_in_epoch"):
        dataset.batches_per_epoch()


def test_rated_dataset_off_or_at_100_percent_keeps_everything(tmp_path):
    _rated_dataset(tmp_path, count=5)
    off = load(tmp_path, batch_size=1, max_epochs=10)
    kept = load(
        tmp_path,
        batch_size=1,
        max_epochs=10,
        rated_dataset=True,
        rated_dataset_target_dropout_percent=100,
    )
    for epoch in (0, 5, 9):
        assert len(_used(off, epoch)) == len(_used(kept, epoch)) == 10
    assert off.batches_in_run() == 100


def test_rated_dataset_kept_images_keep_their_multiply(tmp_path):
    _rated_dataset(tmp_path, count=5)
    (tmp_path / "high" / "multiply.txt").write_text("2", "utf-8")
    dataset = load(
        tmp_path,
        batch_size=1,
        max_epochs=4,
        rated_dataset=True,
        rated_dataset_target_dropout_percent=0,
    )
    used = _used(dataset, 3)  # keeps ceil(10 × (4 − 2) / 4) = 5 images
    assert len(used) == 5
    for index, count in used.items():
        assert count == (2 if dataset.images[index].path.parent.name == "high" else 1)


def test_max_caption_length_cuts_shuffled_captions_at_whole_tags(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "x.yaml").write_text(
        "main_prompt: main\ntags: [aaaa, bbbb, cccc, dddd]\nmax_caption_length: 17\n", "utf-8"
    )
    dataset = load(tmp_path, batch_size=1, shuffle_tags=True)
    captions = _captions(dataset, "x.png", epochs=20)
    assert len(captions) > 3
    for caption in captions:  # "main, aaaa, bbbb" is 16 characters; a third tag would be 22
        assert len(caption) <= 17 and caption.startswith("main, ") and caption.count(",") == 2


@pytest.mark.parametrize(
    ("file_name", "text"),
    [
        ("batch_id.txt", "group"),
        ("loss_scale.txt", "0.5"),
        ("shuffle_tags.txt", ""),
        ("local.yaml", "rating: 3\n"),
        ("local.yaml", "max_caption_length: 100\n"),
    ],
)
def test_fingerprint_covers_every_new_setting(tmp_path, file_name, text):
    write_image(tmp_path / "x.png")
    before = load(tmp_path).fingerprint()
    (tmp_path / file_name).write_text(text, "utf-8")
    assert load(tmp_path).fingerprint() != before


def test_fingerprint_covers_rated_settings_but_not_the_live_grad_accum(tmp_path):
    write_image(tmp_path / "x.png")
    base = load(tmp_path).fingerprint()
    assert load(tmp_path, rated_dataset=True).fingerprint() != base
    rated = load(tmp_path, rated_dataset=True, max_epochs=5).fingerprint()
    assert load(tmp_path, rated_dataset=True, max_epochs=6).fingerprint() != rated
    assert load(tmp_path, max_epochs=6).fingerprint() == base  # only rated plans depend on it


def test_two_ranks_split_batch_id_and_rated_plans(tmp_path):
    _horses_and_others(tmp_path, horses=9, others=9)
    (tmp_path / "others" / "local.yaml").write_text("rating: 3\n", "utf-8")
    options = {"rated_dataset": True, "max_epochs": 6, "shuffle_tags": True}
    ranks = [load(tmp_path, batch_size=2, rank=r, world_size=2, **options) for r in range(2)]
    single = load(tmp_path, batch_size=4, **options)
    for epoch in range(6):
        steps = single.batches_in_epoch(epoch)
        assert ranks[0].batches_in_epoch(epoch) == ranks[1].batches_in_epoch(epoch) == steps
        a, b, whole = (d.epoch_batches(epoch, grad_accum=2) for d in (*ranks, single))
        assert len(a) == len(b) == len(whole) == steps
        for x, y, w in zip(a, b, whole, strict=True):
            assert x.bucket == y.bucket == w.bucket and x.items + y.items == w.items
