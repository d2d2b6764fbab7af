"""The validation sets: a deterministic held-out split that never trains, manual folders scanned
like data_root, fixed batches, and the dry run's counts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from config.validation_config import ValidationSettings
from data.holdout import fixed_batches, split
from tests.data_fixtures import load, write_image
from tests.e2e import EXAMPLE_DATA, run, write_config
from training.validation.sets import prepare_validation


def images(root: Path, count: int = 20) -> Path:
    for i in range(count):
        size = (32, 32) if i % 3 else (48, 24)
        write_image(root / f"sub{i % 2}" / f"image number {i}.png", size, (10 * i, 30, 30))
    return root


def automatic(path: Path, **changes: object) -> ValidationSettings:
    return replace(ValidationSettings(path=path), **changes)


def paths(records) -> list[str]:
    return sorted(str(r.path) for r in records)


def test_automatic_split_is_deterministic_and_never_trained(tmp_path):
    root = images(tmp_path / "data")
    full = load(root, max_epochs=5)
    settings = automatic(tmp_path / "v.json", auto_split_proportion=0.15)
    trained, data = prepare_validation(settings, full)
    again, data_again = prepare_validation(settings, load(root, max_epochs=5))
    assert data is not None and data_again is not None
    (held,) = data.sets
    assert held.name == "val" and len(held.dataset.images) == 3  # ceil(0.15 × 20)
    assert paths(held.dataset.images) == paths(data_again.sets[0].dataset.images)
    assert paths(trained.images) == paths(again.images)
    assert len(trained.images) == 17 and data.train_images == 17
    assert [r.index for r in trained.images] == list(range(17))
    held_paths = set(paths(held.dataset.images))
    for epoch in range(5):
        for plan in trained.epoch_batches(epoch):
            assert not {item.path for item in plan.items} & held_paths
    assert trained.batches_in_epoch(0) < full.batches_in_epoch(0)
    assert trained.fingerprint() != full.fingerprint()
    other, other_data = prepare_validation(replace(settings, seed=556), load(root))
    assert other_data is not None
    assert paths(other_data.sets[0].dataset.images) != paths(held.dataset.images)
    assert other.fingerprint() != trained.fingerprint()


def test_split_takes_at_least_one_and_skips_multiply_zero(tmp_path):
    root = images(tmp_path / "data", count=4)
    (root / "sub0" / "multiply.txt").write_text("0")
    dataset = load(root)
    chosen, rest = split(dataset.images, 0.01, 555, "validation")
    assert len(chosen) == 1 and chosen[0].multiply > 0
    assert len(rest) == 3


def test_stabilize_overlaps_training_and_evaluates_each_image_once(tmp_path):
    root = images(tmp_path / "data")
    settings = automatic(
        tmp_path / "v.json",
        validate_training=False,
        stabilize_training_loss=True,
        stabilize_split_proportion=0.5,
    )
    trained, data = prepare_validation(settings, load(root, flip_p=0.5, cond_dropout=0.5))
    assert data is not None and len(trained.images) == 20  # nothing held out
    (stabilized,) = data.sets
    assert stabilized.name == "train-stabilized" and len(stabilized.dataset.images) == 10
    assert set(paths(stabilized.dataset.images)) <= set(paths(trained.images))
    items = [item for plan in stabilized.plans for item in plan.items]
    assert sorted(item.image_index for item in items) == list(range(10))
    assert not any(item.flipped or item.dropped for item in items)
    for plan in stabilized.plans:
        assert len({stabilized.dataset.images[i.image_index].bucket for i in plan.items}) == 1


def test_manual_folder_is_scanned_like_data_root(tmp_path):
    extra = {"stripes": EXAMPLE_DATA / "stripes"}
    settings = automatic(
        tmp_path / "v.json", val_split_mode="manual", manual_data_root=EXAMPLE_DATA, extra=extra
    )
    training = load(EXAMPLE_DATA)
    trained, data = prepare_validation(settings, training)
    assert data is not None and trained is training
    val, stripes = data.sets
    assert (val.name, stripes.name) == ("val", "stripes")
    captions = {r.path: (r.caption, r.bucket) for r in training.images}
    assert {r.path: (r.caption, r.bucket) for r in val.dataset.images} == captions
    assert len(stripes.dataset.images) == 4


def test_fixed_batches_are_the_same_every_time(tmp_path):
    dataset = load(images(tmp_path / "data"))
    first, second = fixed_batches(dataset.images, 3), fixed_batches(dataset.images, 3)
    assert first == second
    assert sorted(i.image_index for p in first for i in p.items) == list(range(20))
    assert all(len(p.items) <= 3 for p in first)


def test_dry_run_counts_train_and_validation_images(tmp_path, capsys):
    validation = tmp_path / "validation.json"
    extra = {"stripes": str(EXAMPLE_DATA / "stripes")}
    validation.write_text(
        json.dumps({"extra_manual_datasets": extra, "stabilize_training_loss": True})
    )
    config = write_config(tmp_path, validation_config=str(validation))
    assert run(config, "--dry_run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["images"] == 10  # 12 - ceil(0.15 × 12)
    sets = report["validation"]["sets"]
    assert {name: s["images"] for name, s in sets.items()} == {
        "val": 2,
        "stripes": 4,
        "train-stabilized": 2,
    }
    assert report["validation"]["train_images"] == 10
    assert report["run"]["total_optimizer_steps"] == 2 * report["data"]["steps_per_epoch"]
