"""``latent_cache_dir``: keys, files, damage, and a run over a warm cache trained as in memory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from data import DataSettings, load_dataset
from models import load_models
from tests.e2e import ADAMW, checkpoints, run, run_folders, trained_weights, write_config
from training.disk_cache import (
    DiskLatentCache,
    EntryIdentity,
    entry_key,
    entry_path,
    open_disk_cache,
    read_entry,
    vae_digest,
    write_entry,
)
from training.latent_cache import build_latent_cache
from training.precision import Precision

WHO = EntryIdentity(vae="v", precision="fp32", transforms="t")
FP32 = Precision("cpu", None)


def test_the_key_follows_what_decides_the_latents():
    key = entry_key("image", (64, 64), False, WHO)
    assert entry_key("image", (64, 64), False, WHO) == key  # stable
    others = [
        entry_key("other image", (64, 64), False, WHO),
        entry_key("image", (64, 32), False, WHO),
        entry_key("image", (64, 64), True, WHO),
        entry_key("image", (64, 64), False, EntryIdentity("other vae", "fp32", "t")),
        entry_key("image", (64, 64), False, EntryIdentity("v", "bfloat16 autocast", "t")),
        entry_key("image", (64, 64), False, EntryIdentity("v", "fp32", "other transform")),
    ]
    assert len({key, *others}) == len(others) + 1


def test_entries_live_two_folders_deep_and_are_written_whole(tmp_path):
    key = entry_key("image", (64, 64), False, WHO)
    path = entry_path(tmp_path, key)
    assert path.relative_to(tmp_path).parts == (key[:2], key[2:4], f"{key}.safetensors")
    mean, std = torch.randn(4, 8, 8), torch.rand(4, 8, 8)
    write_entry(path, mean, std)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    got = read_entry(path, (4, 8, 8))
    assert got is not None and torch.equal(got[0], mean) and torch.equal(got[1], std)
    assert read_entry(path, (4, 8, 4)) is None  # another bucket's shape


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "empty", "garbage"])
def test_a_damaged_entry_is_never_read(tmp_path, damage):
    path = tmp_path / "entry.safetensors"
    write_entry(path, torch.randn(4, 8, 8), torch.rand(4, 8, 8))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip a byte":
        raw[-7] ^= 0xFF
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(b"\xff" * len(raw))
    path.write_bytes(bytes(raw))
    assert read_entry(path, (4, 8, 8)) is None


def test_the_vae_digest_changes_with_any_weight():
    vae = load_models("tiny-sd15").vae
    before = vae_digest(vae)
    assert vae_digest(vae) == before
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-3
    assert vae_digest(vae) != before


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for n in range(count):
        pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"image{n}.png")
        (folder / f"image{n}.txt").write_text(f"caption {n}")
    return folder


@pytest.fixture(scope="module")
def bundle():
    return load_models("tiny-sd15")


def _dataset(root: Path):
    settings = DataSettings(
        data_root=root,
        resolution=64,
        batch_size=2,
        seed=1,
        flip_p=0.5,
        cond_dropout=0.0,
        shuffle_tags=False,
        keep_tags=0,
        dataloader_num_workers=0,
    )
    return load_dataset(settings)


def test_the_disk_cache_holds_what_the_memory_cache_holds(tmp_path, bundle, caplog):
    dataset = _dataset(_images(tmp_path / "data", 5))
    memory = build_latent_cache(dataset, bundle, FP32, torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        disk = open_disk_cache(dataset, bundle, FP32, torch.device("cpu"), tmp_path / "cache")
    assert isinstance(disk, DiskLatentCache) and len(disk) == len(memory) == 10
    assert "10 entries, 0 found, 10 encoded" in caplog.text
    assert not any(isinstance(v, torch.Tensor) for v in vars(disk).values())  # nothing kept
    for key in disk.paths:
        assert torch.equal(disk._entry(key)[0], memory.means[key])
        assert torch.equal(disk._entry(key)[1], memory.stds[key])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = open_disk_cache(dataset, bundle, FP32, torch.device("cpu"), tmp_path / "cache")
    assert "10 entries, 10 found, 0 encoded" in caplog.text
    assert again.paths == disk.paths


def test_a_changed_image_encodes_only_its_own_entries(tmp_path, bundle, caplog):
    data = _images(tmp_path / "data", 4)
    cache = tmp_path / "cache"
    first = open_disk_cache(_dataset(data), bundle, FP32, torch.device("cpu"), cache)
    Image.new("RGB", (64, 64), "red").save(data / "image2.png")
    with caplog.at_level(logging.INFO):
        second = open_disk_cache(_dataset(data), bundle, FP32, torch.device("cpu"), cache)
    assert "8 entries, 6 found, 2 encoded" in caplog.text
    changed = {key for key in first.paths if first.paths[key] != second.paths[key]}
    assert {index for index, _ in changed} == {2}


def test_damaged_entries_are_encoded_again_with_a_warning(tmp_path, bundle, caplog):
    dataset = _dataset(_images(tmp_path / "data", 3))
    cache = tmp_path / "cache"
    good = open_disk_cache(dataset, bundle, FP32, torch.device("cpu"), cache)
    expected = {key: good._entry(key) for key in good.paths}
    keys = sorted(good.paths)
    truncated, flipped = good.paths[keys[0]], good.paths[keys[1]]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0x01  # same size: found only when read
    flipped.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO):
        cache_again = open_disk_cache(dataset, bundle, FP32, torch.device("cpu"), cache)
        assert f"{truncated} is truncated or damaged" in caplog.text
        assert "6 entries, 5 found, 1 encoded" in caplog.text
        got = {key: cache_again._entry(key) for key in cache_again.paths}
    assert f"{flipped} is damaged; encoding its image again" in caplog.text
    for key in keys:
        assert torch.equal(got[key][0], expected[key][0])  # encoded with the same neighbours
        assert torch.equal(got[key][1], expected[key][1])
    assert read_entry(flipped, got[keys[1]][0].shape) is not None  # written back whole


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cache", "latent_cache_dir: needs cache_latents: true"),
        ("", "latent_cache_dir: expected a path, got an empty string"),
        ("file", "cannot hold the cache"),
        ("file/below", "cannot hold the cache"),
    ],
)
def test_a_latent_cache_dir_that_cannot_be_used_is_one_message(tmp_path, caplog, value, message):
    (tmp_path / "file").write_text("not a folder")
    folder = "" if value == "" else str(tmp_path / value)
    config = write_config(tmp_path / "run", latent_cache_dir=folder, cache_latents=value != "cache")
    assert run(config, "--dry_run") == 2
    assert message in caplog.text


@pytest.mark.slow
def test_a_warm_disk_cache_trains_bit_for_bit_as_the_memory_cache(tmp_path):
    """Memory cache, cold disk cache, warm disk cache (one entry truncated): the same weights."""
    cache = tmp_path / "cache"
    keys = {"max_epochs": 2, "save_full_precision": True, "cache_latents": True}
    weights = {}
    for name in ("memory", "cold", "warm"):
        extra = {} if name == "memory" else {"latent_cache_dir": str(cache)}
        if name == "warm":
            entry = next(cache.glob("*/*/*.safetensors"))
            entry.write_bytes(entry.read_bytes()[:-1])
        assert run(write_config(tmp_path / name, ADAMW, **keys, **extra)) == 0
        (last,) = checkpoints(tmp_path / name, "last-")
        weights[name] = trained_weights(last)
    log = (run_folders(tmp_path / "warm")[0] / "train.log").read_text()
    assert "truncated or damaged" in log and " 1 encoded" in log
    for name in ("cold", "warm"):
        assert all(torch.equal(weights["memory"][k], weights[name][k]) for k in weights[name])
    shutil.rmtree(cache)
