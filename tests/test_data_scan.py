"""Discovery and bad input (issue 3; see docs/data.md): skipped files, user errors, summary."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image

from config.errors import UserError
from tests.data_fixtures import load, write_image


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_recursive_discovery_any_case_extension_hidden_left_out(tmp_path):
    for name in ["a.jpg", "b.JPEG", "c.Png", "sub/d.bmp", "sub/deeper/e.webp", "f.jfif", "g.JPG"]:
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a caption of anything", "utf-8")
    (tmp_path / "animation.gif").write_bytes(b"GIF89a")  # not a training extension: ignored
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: hidden
    write_image(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jpg")  # hidden folder
    dataset = load(tmp_path)
    found = sorted(str(image.path.relative_to(tmp_path)) for image in dataset.images)
    assert found == [
        "a.jpg",
        "b.JPEG",
        "c.Png",
        "f.jfif",
        "g.JPG",
        "sub/d.bmp",
        "sub/deeper/e.webp",
    ]
    assert dataset.skipped == []
    assert [image.index for image in dataset.images] == list(range(7))


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    jpeg = _jpeg_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture", "utf-8")
    (tmp_path / "garbage.jpg").write_bytes(bytes(range(256)) * 8)
    write_image(tmp_path / "thin.png", size=(1, 2000))
    write_image(tmp_path / "tiny.png", size=(5, 5))
    write_image(tmp_path / "strip.png", size=(200, 10))
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path)
    assert [image.path.name for image in dataset.images] == ["good.png"]
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in dataset.skipped}
    assert set(reasons) == {
        "truncated.jpg",
        "zero.png",
        "text.png",
        "garbage.jpg",
        "thin.png",
        "tiny.png",
        "strip.png",
    }
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["text.png"] == "not an image file that Pillow can read"
    assert reasons["garbage.jpg"] == "not an image file that Pillow can read"
    assert reasons["thin.png"].startswith("too small: 1x2000 px")
    assert reasons["tiny.png"].startswith("too small: 5x5 px")
    assert reasons["strip.png"].startswith("aspect too extreme: 200x10 px")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 7
    assert all(w.startswith("skipping ") and "\n" not in w for w in warnings)
    summary = dataset.summary()
    assert summary["images"] == 1
    assert summary["skipped"] == dataset.skipped
    paths = [entry["path"] for entry in summary["skipped"]]
    assert paths == sorted(str(tmp_path / name) for name in reasons)


def test_aspect_limits_are_inclusive(tmp_path):
    write_image(tmp_path / "eight_to_one.png", size=(128, 16))
    write_image(tmp_path / "eight_px.png", size=(8, 8))
    assert len(load(tmp_path).images) == 2


def test_missing_data_root(tmp_path):
    with pytest.raises(UserError, match=r"data_root: .*nowhere does not exist"):
        load(tmp_path / "nowhere")


def test_data_root_is_a_file(tmp_path):
    path = write_image(tmp_path / "x.png")
    with pytest.raises(UserError, match="is not a folder"):
        load(path)


def test_empty_data_root(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here", "utf-8")
    with pytest.raises(UserError, match=r"data_root: no image files \(.*\.jpg.*\) found in"):
        load(tmp_path)


def test_data_root_with_only_bad_images(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"no usable image .* all 1 image files or folders were"):
        load(tmp_path)


def test_every_multiply_zero_is_a_user_error(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "multiply.txt").write_text("0", "utf-8")
    with pytest.raises(UserError, match="multiply 0"):
        load(tmp_path)


def test_summary_counts_images_per_bucket(tmp_path):
    for k in range(3):
        write_image(tmp_path / f"square{k}.png", size=(40, 40))
    write_image(tmp_path / "wide.png", size=(80, 40))
    summary = load(tmp_path, batch_size=2).summary()
    assert summary["images"] == 4
    assert summary["buckets"] == {"64x64": 3, "80x48": 1}
    assert summary["steps_per_epoch"] == 3  # 3 squares → 2 batches, 1 wide → 1 batch
    assert summary["images_per_epoch"] == 4
    assert summary["dataloader_num_workers"] == 0


def test_symlinked_folders_are_followed_once(tmp_path):
    write_image(tmp_path / "real" / "x.png")
    (tmp_path / "real" / "loop").symlink_to(tmp_path)  # a cycle back to the root
    (tmp_path / "link").symlink_to(tmp_path / "real")
    dataset = load(tmp_path)
    assert len(dataset.images) == 1
