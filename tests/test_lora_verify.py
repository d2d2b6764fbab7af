"""Every LoRA file is read back and compared before it takes its place."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import lora.files
from config.errors import UserError
from lora.files import (
    DIFFUSERS_WEIGHTS,
    LoraFileMismatchError,
    write_diffusers_file,
    write_kohya_file,
)
from tests.lora_helpers import RANK4, adapted, info_of, models_of


@pytest.fixture(scope="module")
def bundle():
    return adapted("tiny-sd15")


def write_kohya(bundle, path: Path, full_precision: bool = False) -> Path:
    return write_kohya_file(path, models_of(bundle), RANK4, info_of(bundle), full_precision)


def flipping_one_byte(real_save):
    """A save_file that writes the file, then flips a byte of its last tensor's data."""

    def save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = bytearray(Path(filename).read_bytes())
        data[-1] ^= 0x40
        Path(filename).write_bytes(bytes(data))

    return save


def test_a_flipped_byte_is_caught_and_the_older_file_stays(bundle, tmp_path, monkeypatch):
    path = write_kohya(bundle, tmp_path / "run.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(
        lora.files.safetensors.torch, "save_file", flipping_one_byte(safetensors.torch.save_file)
    )
    with pytest.raises(LoraFileMismatchError) as caught:
        write_kohya(bundle, path)
    message = str(caught.value)
    assert str(path) in message and "differs from the adapter weights in memory" in message
    assert ".lora_" in message or ".alpha" in message  # names the key
    assert path.read_bytes() == before  # the older file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]  # no temporary left


def test_a_writer_that_drops_a_tensor_is_caught(bundle, tmp_path, monkeypatch):
    real = safetensors.torch.save_file

    def dropping(tensors, filename, metadata=None):
        tensors = dict(tensors)
        tensors.pop(sorted(tensors)[0])
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(lora.files.safetensors.torch, "save_file", dropping)
    path = tmp_path / "run.safetensors"
    with pytest.raises(LoraFileMismatchError, match="it lacks lora_te_text_model_"):
        write_kohya(bundle, path)
    assert not path.exists()


def test_wrong_metadata_is_caught(bundle, tmp_path, monkeypatch):
    real = safetensors.torch.save_file

    def relabelling(tensors, filename, metadata=None):
        real(tensors, filename, metadata={**metadata, "ss_network_dim": "8"})

    monkeypatch.setattr(lora.files.safetensors.torch, "save_file", relabelling)
    with pytest.raises(LoraFileMismatchError, match="metadata differs"):
        write_kohya(bundle, tmp_path / "run.safetensors")


def test_the_diffusers_file_is_checked_too(bundle, tmp_path, monkeypatch):
    import diffusers.loaders.lora_base as lora_base

    monkeypatch.setattr(
        lora_base.safetensors.torch, "save_file", flipping_one_byte(safetensors.torch.save_file)
    )
    with pytest.raises(LoraFileMismatchError, match=DIFFUSERS_WEIGHTS):
        write_diffusers_file(tmp_path, models_of(bundle), False)
    assert not (tmp_path / DIFFUSERS_WEIGHTS).exists()


def test_weights_beyond_fp16_need_full_precision(tmp_path):
    bundle = adapted("tiny-sd15")
    layer = bundle.unet.down_blocks[0].attentions[0].proj_in
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = 1e6
    with pytest.raises(OverflowError, match="save_full_precision"):
        write_kohya(bundle, tmp_path / "run.safetensors")
    write_kohya(bundle, tmp_path / "run.safetensors", full_precision=True)  # fp32 holds it


def test_an_unwritable_folder_is_a_user_error(bundle, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        write_kohya(bundle, blocker / "run.safetensors")
