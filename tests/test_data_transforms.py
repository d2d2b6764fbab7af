"""Data transforms (EveryDream2 plugins' transform_caption / transform_pil_image): applied each
time an image is used, in EveryDream2's order, in worker processes too."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from config.errors import UserError
from data import DataTransformError, DataTransforms, make_loader
from tests.data_fixtures import load

GREEN = (0, 255, 0)


class Recorder:
    """Records every call in a file (worker processes too) and marks what it returns."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def _write(self, *entry: object) -> None:
        with self.log.open("a", encoding="utf-8") as file:
            file.write(json.dumps([*entry, os.getpid()]) + "\n")

    def caption(self, caption: str) -> str:
        self._write("caption", caption)
        return caption + " +t"

    def image(self, image: Image.Image) -> Image.Image:
        self._write("image", list(image.size), list(image.getpixel((0, 0))))
        marked = image.copy()
        marked.putpixel((0, 0), GREEN)
        return marked

    def calls(self) -> list[list]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text("utf-8").splitlines()]


class WrongSize(Recorder):
    def image(self, image: Image.Image) -> Image.Image:
        return image.resize((10, 10))


def _half_red_half_blue(path: Path) -> None:
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _dataset(tmp_path, **options):
    for k in range(3):
        _half_red_half_blue(tmp_path / "data" / f"img{k}.png")
        (tmp_path / "data" / f"img{k}.txt").write_text(f"main {k}, a, b, c, d", "utf-8")
    recorder = options.pop("recorder", Recorder(tmp_path / "calls.jsonl"))
    dataset = load(tmp_path / "data", batch_size=3, shuffle_tags=True, flip_p=1.0, **options)
    dataset.transforms = recorder
    return dataset, recorder


def test_recorder_is_a_data_transforms():
    assert isinstance(Recorder(Path("x")), DataTransforms)


@pytest.mark.parametrize("workers", [0, 1])
def test_image_transform_sees_the_cropped_flipped_image_and_reaches_the_tensor(tmp_path, workers):
    dataset, recorder = _dataset(tmp_path, dataloader_num_workers=workers)
    [batch] = list(make_loader(dataset, 0))
    images = [call for call in recorder.calls() if call[0] == "image"]
    assert len(images) == 3
    for _, size, corner, pid in images:
        assert size == [64, 64]  # after crop/resize to the bucket
        assert corner == [0, 0, 255]  # after the flip: the blue half is now on the left
        assert (pid != os.getpid()) == (workers > 0)  # ran in the worker process
    for pixels in batch.pixel_values:  # the transform's result, then the tensor
        assert torch.equal(pixels[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
        assert torch.equal(pixels[:, 0, 1], torch.tensor([-1.0, -1.0, 1.0]))


@pytest.mark.parametrize("workers", [0, 1])
def test_caption_transform_after_shuffle_before_dropout(tmp_path, workers):
    dataset, recorder = _dataset(tmp_path, dataloader_num_workers=workers, cond_dropout=0.0)
    [plan] = dataset.epoch_batches(0)
    [batch] = list(make_loader(dataset, 0))
    assert batch.captions == tuple(item.caption + " +t" for item in plan.items)
    seen = [call[1] for call in recorder.calls() if call[0] == "caption"]
    assert seen == [item.caption for item in plan.items]  # the shuffled captions
    assert all(caption.startswith("main ") for caption in seen)

    dropped, recorder = _dataset(
        tmp_path / "dropped", dataloader_num_workers=workers, cond_dropout=1.0
    )
    [batch] = list(make_loader(dropped, 0))
    assert batch.captions == ("", "", "")  # a dropped caption stays empty
    # EveryDream2 runs the caption transform before dropout, on the caption as planned
    assert len([call for call in recorder.calls() if call[0] == "caption"]) == 3


def test_transforms_run_each_time_an_image_is_used(tmp_path):
    dataset, recorder = _dataset(tmp_path, dataloader_num_workers=0)
    batches = list(make_loader(dataset, 0, end_epoch=3))
    assert len(batches) == 3
    calls = Counter(call[0] for call in recorder.calls())
    assert calls == {"image": 9, "caption": 9}  # no in-process memo with transforms


def test_batches_without_pixels_have_the_loaders_captions(tmp_path):
    dataset, _ = _dataset(tmp_path, cond_dropout=0.5)
    loaded = [b.captions for b in make_loader(dataset, 0, end_epoch=4)]
    planned = [b.captions for b in dataset.batches_without_pixels(0, 0, 4)]
    assert loaded == planned
    assert any("" in captions for captions in planned)
    assert all(c.endswith(" +t") for captions in planned for c in captions if c)
    resumed = [b.captions for b in dataset.batches_without_pixels(2, 0, 4)]
    assert resumed == planned[2:]


def test_decode_for_the_latent_cache_applies_the_image_transform(tmp_path):
    dataset, recorder = _dataset(tmp_path)
    pixels = dataset.decode(0, flipped=True)
    assert pixels.shape == (3, 64, 64)
    assert torch.equal(pixels[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    [(_, _, corner, _)] = recorder.calls()
    assert corner == [0, 0, 255]
    plain = dataset.decode(0, flipped=False)
    assert torch.equal(plain[:, 0, 1], torch.tensor([1.0, -1.0, -1.0]))  # red, not flipped


def test_transforms_survive_pickling(tmp_path):
    dataset, _ = _dataset(tmp_path)
    copy = pickle.loads(pickle.dumps(dataset))
    assert isinstance(copy.transforms, Recorder)
    assert copy.transforms.log == dataset.transforms.log


@pytest.mark.parametrize("workers", [0, 1])
def test_a_transform_returning_a_wrong_image_is_one_clear_error(tmp_path, workers):
    dataset, _ = _dataset(
        tmp_path, dataloader_num_workers=workers, recorder=WrongSize(tmp_path / "calls.jsonl")
    )
    with pytest.raises(DataTransformError) as error:
        list(make_loader(dataset, 0))
    assert isinstance(error.value, UserError)
    message = str(error.value)
    assert "must return a 64x64 PIL image" in message and "10x10" in message
    assert "\n" not in message  # not wrapped in a worker traceback
