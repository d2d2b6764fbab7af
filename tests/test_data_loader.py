"""make_loader: tensors that match the plan, workers, start_batch resume, files that go bad."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import data.loader
from data import DataRootChangedError, decode_image, make_loader
from tests.data_fixtures import load, write_image

REPO = Path(__file__).resolve().parent.parent


def _colourful_dataset(root: Path, count: int = 7) -> None:
    for k in range(count):
        size = [(40, 40), (80, 40), (40, 80)][k % 3]
        write_image(root / f"image {k}_.png", size=size, color=(30 * k, 255 - 30 * k, 100))


def test_batches_match_the_plan(tmp_path):
    _colourful_dataset(tmp_path)
    dataset = load(tmp_path, batch_size=2, flip_p=0.5, cond_dropout=0.3)
    plans = dataset.epoch_batches(1)
    batches = list(make_loader(dataset, 1))
    assert len(batches) == len(plans) == dataset.batches_per_epoch()
    for batch, plan in zip(batches, plans, strict=True):
        width, height = plan.bucket
        assert batch.bucket == plan.bucket and batch.index == plan.index
        assert batch.pixel_values.shape == (2, 3, height, width)
        assert batch.pixel_values.dtype == torch.float32
        assert batch.pixel_values.min() >= -1.0 and batch.pixel_values.max() <= 1.0
        assert batch.paths == tuple(item.path for item in plan.items)
        assert batch.captions == tuple("" if i.dropped else i.caption for i in plan.items)
        assert batch.flipped == tuple(item.flipped for item in plan.items)
        assert batch.image_indices == tuple(item.image_index for item in plan.items)
        for pixels, item in zip(batch.pixel_values, plan.items, strict=True):
            expected = decode_image(Path(item.path), plan.bucket, item.flipped)
            assert torch.equal(pixels, expected)


def test_start_batch_skips_without_decoding(tmp_path, monkeypatch):
    _colourful_dataset(tmp_path)
    dataset = load(tmp_path, batch_size=1)
    full = list(make_loader(dataset, 3))
    decoded: list[str] = []
    real_load = data.loader.load_fitted

    def counting_load(path, bucket):
        decoded.append(str(path))
        return real_load(path, bucket)

    monkeypatch.setattr(data.loader, "load_fitted", counting_load)
    resumed = list(make_loader(dataset, 3, start_batch=4))
    assert len(decoded) == len(full) - 4
    assert [b.paths for b in resumed] == [b.paths for b in full[4:]]
    assert [b.index for b in resumed] == list(range(4, len(full)))
    for a, b in zip(resumed, full[4:], strict=True):
        assert torch.equal(a.pixel_values, b.pixel_values)
    assert list(make_loader(dataset, 3, start_batch=len(full))) == []


def test_workers_give_the_same_batches(tmp_path):
    _colourful_dataset(tmp_path, count=6)
    in_process = list(make_loader(load(tmp_path, batch_size=2, flip_p=0.5), 0))
    workers = load(tmp_path, batch_size=2, flip_p=0.5, dataloader_num_workers=2)
    assert workers.num_workers == 2
    with_workers = list(make_loader(workers, 0, pin_memory=False))
    assert len(with_workers) == len(in_process)
    for a, b in zip(with_workers, in_process, strict=True):
        assert a.paths == b.paths and a.captions == b.captions
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_default_worker_count(tmp_path, monkeypatch):
    _colourful_dataset(tmp_path, count=3)
    assert load(tmp_path, dataloader_num_workers=None).num_workers == 0  # training on the CPU
    monkeypatch.setattr("data.settings.available_cpus", lambda: 16)
    cuda = load(tmp_path, dataloader_num_workers=None, device_type="cuda")
    assert cuda.num_workers == 4  # even for a tiny dataset: workers start once per run
    assert load(tmp_path, dataloader_num_workers=2, device_type="cpu").num_workers == 2


def test_one_loader_spans_several_epochs_and_resumes_mid_epoch(tmp_path):
    _colourful_dataset(tmp_path, count=5)
    dataset = load(tmp_path, batch_size=2, flip_p=0.5, shuffle_tags=True)
    per_epoch = dataset.batches_per_epoch()
    spanning = list(make_loader(dataset, 0, end_epoch=3))
    assert [b.epoch for b in spanning] == [e for e in range(3) for _ in range(per_epoch)]
    separate = [b for e in range(3) for b in make_loader(dataset, e)]
    assert [b.paths for b in spanning] == [b.paths for b in separate]
    resumed = list(make_loader(dataset, 1, start_batch=1, end_epoch=3))
    assert [b.paths for b in resumed] == [b.paths for b in spanning[per_epoch + 1 :]]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_goes_bad_after_the_scan_is_replaced_not_fatal(tmp_path, caplog, workers):
    for k in range(3):
        write_image(tmp_path / f"img{k}.png", color=(80 * k, 0, 0))
    dataset = load(tmp_path, batch_size=3, dataloader_num_workers=workers)
    (tmp_path / "img1.png").write_bytes(b"broken now")
    with caplog.at_level(logging.WARNING):
        [batch] = list(make_loader(dataset, 0))
    assert batch.pixel_values.shape == (3, 3, 64, 64)
    assert str(tmp_path / "img1.png") not in batch.paths
    if workers == 0:  # records from worker processes do not reach caplog
        assert "img1.png" in caplog.text


def test_every_file_of_a_bucket_gone_is_a_clear_error(tmp_path):
    write_image(tmp_path / "only.png")
    dataset = load(tmp_path, batch_size=1)
    (tmp_path / "only.png").unlink()
    with pytest.raises(DataRootChangedError, match="no image of bucket 64x64 can be decoded"):
        list(make_loader(dataset, 0))


def test_the_bundled_example_dataset():
    root = REPO / "examples" / "data"
    dataset = load(root, resolution=64, batch_size=2)
    summary = dataset.summary()
    assert summary["images"] == 12 and summary["skipped"] == []
    assert len(summary["buckets"]) >= 3
    sources = {image.caption_source.rsplit(".", 1)[-1] for image in dataset.images}
    assert {"file name", "txt", "caption", "yaml"} <= sources
    stripes = [image for image in dataset.images if image.path.parent.name == "stripes"]
    assert stripes and all(image.caption.endswith("striped pattern") for image in stripes)
    assert len(list(make_loader(dataset, 0))) == summary["steps_per_epoch"]
    assert sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) < 300_000


def test_example_generator_reproduces_the_bundled_dataset(tmp_path):
    from examples.make_example_data import write_dataset

    bundled_root, new_root = REPO / "examples" / "data", tmp_path / "regenerated"
    write_dataset(new_root)

    def described(root: Path) -> list[tuple[str, tuple[int, int], str]]:
        return [(str(i.path.relative_to(root)), i.size, i.caption) for i in load(root).images]

    assert described(new_root) == described(bundled_root)
    for path in new_root.rglob("*.png"):
        assert path.read_bytes() == (bundled_root / path.relative_to(new_root)).read_bytes()


def test_in_process_loading_decodes_each_image_once(tmp_path, monkeypatch):
    _colourful_dataset(tmp_path, count=5)
    dataset = load(tmp_path, batch_size=2, flip_p=0.5, dataloader_num_workers=0)
    calls = []
    real_load, real_finish = data.loader.load_fitted, data.loader.finish_image

    def counting_load(path, bucket):
        calls.append([path])
        return real_load(path, bucket)

    def counting_finish(image, bucket, flipped, transforms):
        calls[-1].append(flipped)
        return real_finish(image, bucket, flipped, transforms)

    monkeypatch.setattr(data.loader, "load_fitted", counting_load)
    monkeypatch.setattr(data.loader, "finish_image", counting_finish)
    batches = list(make_loader(dataset, 0, end_epoch=4))
    calls_as_tuples = [tuple(call) for call in calls]
    assert len(calls_as_tuples) == len(
        set(calls_as_tuples)
    )  # each (image, flip) decoded once over 4 epochs
    fresh = list(make_loader(dataset, 3))
    assert all(
        torch.equal(a.pixel_values, b.pixel_values)
        for a, b in zip(batches[-len(fresh) :], fresh, strict=True)
    )
