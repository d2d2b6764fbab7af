"""Buckets and decoding: sizes, assignment, cover-resize and crop, flips, EXIF, modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from data import bucket_step, decode_image, make_buckets, nearest_bucket
from data.buckets import crop_box
from tests.data_fixtures import load, record, write_image


@pytest.mark.parametrize("resolution", range(256, 1025, 64))
def test_buckets_follow_the_rules(resolution):
    buckets = make_buckets(resolution)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 0.75 * area <= width * height <= area
        assert 1 / 4 <= width / height <= 4
        assert (height, width) in buckets
    assert max(w / h for w, h in buckets) >= 2.5  # (the 64 px grid allows no 4:1 at 320)


@pytest.mark.parametrize("resolution", [64, 128, 192])
def test_small_resolutions_use_a_step_of_16_and_still_have_wide_buckets(resolution):
    assert bucket_step(resolution) == 16
    buckets = make_buckets(resolution)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= resolution**2 for w, h in buckets)
    assert (resolution, resolution) in buckets
    assert any(w > h for w, h in buckets) and any(w < h for w, h in buckets)


def test_512_bucket_list():
    wide = [b for b in make_buckets(512) if b[0] > b[1]]
    assert sorted(wide) == [
        (576, 448),
        (640, 384),
        (704, 320),
        (768, 320),
        (832, 256),
        (896, 256),
        (960, 256),
        (1024, 256),
    ]


def test_nearest_aspect_on_a_log_scale():
    buckets = make_buckets(512)
    for size in [(1000, 1000), (3000, 2000), (2000, 3000), (4000, 1000), (9000, 1000), (640, 479)]:
        chosen = nearest_bucket(size, buckets)
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(size[0] / size[1]))
        for other in buckets:
            assert distance <= abs(math.log(other[0] / other[1]) - math.log(size[0] / size[1]))
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert nearest_bucket((3000, 2000), buckets) == (640, 384)
    assert nearest_bucket((2000, 3000), buckets) == (384, 640)
    assert nearest_bucket((9000, 1000), buckets) == (1024, 256)


def test_crop_box_keeps_the_centre():
    assert crop_box((200, 100), (64, 64)) == (50.0, 0.0, 150.0, 100.0)
    assert crop_box((100, 300), (64, 128)) == (0.0, 50.0, 100.0, 250.0)
    assert crop_box((128, 64), (128, 64)) == (0.0, 0.0, 128.0, 64.0)


def _three_bands(path, size, horizontal=True):
    """A red sixth, green, a blue sixth (left to right, or top to bottom)."""
    w, h = size
    image = Image.new("RGB", size, (0, 255, 0))
    first = (0, 0, w // 6, h) if horizontal else (0, 0, w, h // 6)
    last = (w - w // 6, 0, w, h) if horizontal else (0, h - h // 6, w, h)
    image.paste((255, 0, 0), first)
    image.paste((0, 0, 255), last)
    image.save(path)
    return path


@pytest.mark.parametrize("source_size", [(256, 128), (48, 24)])  # downscale and upscale
def test_decode_covers_and_crops_the_centre(tmp_path, source_size):
    path = _three_bands(tmp_path / "x.png", source_size)
    pixels = decode_image(path, (64, 64), flipped=False)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    # the red and blue sixths lie outside the centred square and are cropped away
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(pixels, green.expand(3, 64, 64), atol=0.02)


def test_decode_to_a_wide_bucket_keeps_the_whole_width(tmp_path):
    path = _three_bands(tmp_path / "x.png", (128, 64))
    pixels = decode_image(path, (128, 64), flipped=False)
    assert pixels.shape == (3, 64, 128)
    assert pixels[0, 32, 2] > 0.9 and pixels[2, 32, -3] > 0.9  # red left, blue right


def test_flip_mirrors_left_right(tmp_path):
    path = _three_bands(tmp_path / "x.png", (128, 64))
    plain = decode_image(path, (128, 64), flipped=False)
    flipped = decode_image(path, (128, 64), flipped=True)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert not torch.equal(flipped, plain)


def test_exif_orientation_is_applied(tmp_path):
    # stored 64x32, red left half / blue right half, EXIF 6 = "rotate 90° clockwise to view"
    raw = Image.new("RGB", (64, 32), (255, 0, 0))
    raw.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    dataset = load(tmp_path)
    image = record(dataset, "rotated.jpg")
    assert image.size == (32, 64)  # portrait after orientation
    assert image.bucket[0] < image.bucket[1]
    pixels = decode_image(image.path, image.bucket, flipped=False)
    height = pixels.shape[1]
    top, bottom = pixels[:, : height // 4].mean(dim=(1, 2)), pixels[:, -height // 4 :].mean((1, 2))
    assert top[0] > 0.8 and top[2] < -0.8  # what was left (red) is now on top
    assert bottom[2] > 0.8 and bottom[0] < -0.8


def _mean_rgb(path, bucket=(32, 32)):
    return decode_image(path, bucket, flipped=False).mean(dim=(1, 2))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.full((32, 32), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert len(load(tmp_path).images) == 1
    assert torch.allclose(_mean_rgb(tmp_path / "grey16.png"), torch.zeros(3), atol=0.01)


def test_cmyk_becomes_rgb(tmp_path):
    write_image(tmp_path / "cmyk.jpg", color=(255, 0, 0, 0), mode="CMYK")  # pure cyan ink
    assert len(load(tmp_path).images) == 1
    r, g, b = _mean_rgb(tmp_path / "cmyk.jpg")
    assert r < -0.8 and g > 0.8 and b > 0.8


def test_palette_becomes_rgb(tmp_path):
    Image.new("RGB", (32, 32), (0, 0, 255)).quantize(4).save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    assert len(load(tmp_path).images) == 1
    r, g, b = _mean_rgb(tmp_path / "palette.png")
    assert r < -0.9 and g < -0.9 and b > 0.9


@pytest.mark.parametrize(
    ("mode", "color"), [("RGBA", (255, 0, 0, 0)), ("LA", (0, 0)), ("RGBA", (255, 0, 0, 255))]
)
def test_alpha_is_composited_on_white(tmp_path, mode, color):
    write_image(tmp_path / "alpha.png", color=color, mode=mode)
    assert len(load(tmp_path).images) == 1
    mean = _mean_rgb(tmp_path / "alpha.png")
    expected = [1.0, -1.0, -1.0] if color[-1] == 255 else [1.0, 1.0, 1.0]
    assert torch.allclose(mean, torch.tensor(expected), atol=0.01)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "transparent.png", transparency=0)
    assert torch.allclose(_mean_rgb(tmp_path / "transparent.png"), torch.ones(3), atol=0.01)
