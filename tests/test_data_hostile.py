"""Hostile inputs (issue 8): huge numbers, huge captions, names that are not UTF-8, unreadable
folders, and training data that disappears mid-run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

import data.images
import data.scan
from config.errors import UserError
from data import DataRootChangedError, make_loader
from tests.data_fixtures import load, record, write_image

LATIN1_NAME = os.fsdecode(b"caf\xe9 au lait.png")  # not UTF-8: os.walk gives surrogates


def test_multiply_of_1e12_stops_before_any_image_is_decoded(tmp_path, monkeypatch):
    write_image(tmp_path / "x.png")
    (tmp_path / "multiply.txt").write_text("1e12", "utf-8")
    monkeypatch.setattr(data.scan, "probe_image", _must_not_run)
    with pytest.raises(
        UserError, match=r"multiply\.txt: multiply: must be <= 10000, got 1000000000000"
    ):
        load(tmp_path)


def _must_not_run(*args: object) -> None:
    raise AssertionError("an image was decoded before the numbers were checked")


def test_total_images_per_epoch_is_bounded_before_decoding(tmp_path, monkeypatch):
    for k in range(3):
        write_image(tmp_path / f"x{k}.png")
    (tmp_path / "multiply.txt").write_text("5", "utf-8")
    monkeypatch.setattr(data.scan, "MAX_IMAGES_PER_EPOCH", 14)
    monkeypatch.setattr(data.scan, "probe_image", _must_not_run)
    with pytest.raises(UserError, match="15 images per epoch after multiply; at most 14"):
        load(tmp_path)


def test_image_yaml_numbers_are_bounded_and_skip_only_that_image(tmp_path):
    write_image(tmp_path / "good.png")
    write_image(tmp_path / "huge.png")
    (tmp_path / "huge.yaml").write_text("main_prompt: x\nmultiply: 1e12\n", "utf-8")
    write_image(tmp_path / "digits.png")
    (tmp_path / "digits.yaml").write_text(f"max_caption_length: {'9' * 5000}\n", "utf-8")
    dataset = load(tmp_path)
    assert [image.path.name for image in dataset.images] == ["good.png"]
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in dataset.skipped}
    assert "multiply: must be <= 10000, got 1000000000000" in reasons["huge.png"]
    assert "digits.yaml" in reasons["digits.png"]


class _HangError(Exception):
    pass


def _hang_guard(seconds: int):
    """Fails a test that runs minutes (a quadratic merge) instead of a fraction of a second; the
    limit is 50× what it takes, so it is no timing assertion."""

    def alarm(signum: int, frame: object) -> None:
        raise _HangError(f"took more than {seconds} s: not linear")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)


@pytest.mark.slow
def test_a_caption_of_200k_tags_is_merged_in_linear_time(tmp_path):
    tags = [f"tag{k}" for k in range(200_000)]
    write_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text(", ".join(["main", *tags, "tag7"]), "utf-8")
    (tmp_path / "local.yaml").write_text("tags: [" + ", ".join(tags[::2]) + ", folder]\n", "utf-8")
    _hang_guard(30)
    try:
        dataset = load(tmp_path, batch_size=1, shuffle_tags=True)
        [plan] = dataset.epoch_batches(0)
    finally:
        signal.alarm(0)
    image = record(dataset, "x.png")
    assert image.parts == ("main", *tags, "folder")  # each tag once, in order
    assert sorted(plan.items[0].caption.split(", ")[1:]) == sorted([*tags, "folder"])


def test_a_file_name_that_is_not_utf8_is_skipped_with_its_reason(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    write_image(tmp_path / LATIN1_NAME)
    write_image(tmp_path / os.fsdecode(b"dossier \xff") / "inside.png")
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path)
    assert [image.path.name for image in dataset.images] == ["good.png"]
    paths = sorted(entry["path"] for entry in dataset.skipped)
    assert paths == [str(tmp_path / "caf\\xe9 au lait.png"), str(tmp_path / "dossier \\xff")]
    assert all("not valid UTF-8" in entry["reason"] for entry in dataset.skipped)
    # what reaches the dry-run JSON, the logs and the schedule file encodes as UTF-8
    json.dumps(dataset.summary(), ensure_ascii=False).encode("utf-8")
    caplog.text.encode("utf-8")
    dataset.write_schedule(0, tmp_path / "schedule.json")


def test_a_data_root_that_is_not_utf8_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data_root: .*\\xe9.*not valid UTF-8"):
        load(tmp_path / os.fsdecode(b"caf\xe9"))


def test_an_unreadable_subfolder_is_listed_in_skipped(tmp_path, monkeypatch, caplog):
    write_image(tmp_path / "good.png")
    write_image(tmp_path / "locked" / "x.png")
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path="."):  # root may read anything: simulate a permission error
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path)
    assert [image.path.name for image in dataset.images] == ["good.png"]
    assert dataset.skipped == [
        {
            "path": locked,
            "reason": "folder cannot be read (Permission denied); its images are not used",
        }
    ]
    assert f"skipping {locked}: folder cannot be read" in caplog.text


def test_an_unreadable_data_root_is_a_user_error(tmp_path, monkeypatch):
    write_image(tmp_path / "x.png")

    def scandir(path="."):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=r"data_root: .* cannot be read \(Permission denied\)"):
        load(tmp_path)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("remove", ["files", "folder"])
def test_all_images_deleted_mid_run_is_one_clear_error(tmp_path, workers, remove):
    root = tmp_path / "data"
    for k in range(4):
        write_image(root / f"img{k}.png", size=(40, 40) if k % 2 else (80, 40))
    dataset = load(root, batch_size=2, dataloader_num_workers=workers)
    if remove == "folder":
        shutil.rmtree(root)
    else:
        for path in root.glob("*.png"):
            path.unlink()
    with pytest.raises(DataRootChangedError) as error:
        list(make_loader(dataset, 0))
    assert isinstance(error.value, UserError)  # exit status 2, and a crashed- checkpoint first
    message = str(error.value)
    assert message.startswith(f"data_root {root}: ") and "\n" not in message
    if remove == "folder":
        assert "the folder is gone" in message
    else:
        assert "can be decoded any more" in message and "deleted or changed" in message


def test_decode_of_a_deleted_file_is_the_same_error(tmp_path):
    write_image(tmp_path / "x.png")
    dataset = load(tmp_path)
    (tmp_path / "x.png").unlink()
    with pytest.raises(DataRootChangedError, match=r"x\.png cannot be decoded any more"):
        dataset.decode(0, flipped=False)


def test_files_that_go_bad_are_tried_once_per_process(tmp_path, monkeypatch):
    for k in range(6):
        write_image(tmp_path / f"img{k}.png")
    dataset = load(tmp_path, batch_size=2)
    for k in range(5):
        (tmp_path / f"img{k}.png").unlink()
    tried: list[str] = []
    real = data.images.load_fitted

    def counting(path: Path, bucket):
        tried.append(path.name)
        return real(path, bucket)

    monkeypatch.setattr(data.loader, "load_fitted", counting)
    batches = list(make_loader(dataset, 0, end_epoch=3))
    assert all(set(batch.paths) == {str(tmp_path / "img5.png")} for batch in batches)
    assert sorted(set(tried)) == [f"img{k}.png" for k in range(6)]
    assert all(tried.count(f"img{k}.png") == 1 for k in range(5))
