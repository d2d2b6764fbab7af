"""Masked loss: masks from sidecars or alpha, cut and flipped with their image, weighting loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.masks import MASK_SUFFIX, latent_mask, load_mask
from models import load_models
from models.text_keys import standard_text_encoder_state_dict
from tests.data_fixtures import load, write_image
from tests.e2e import EXAMPLE_DATA, checkpoints, run, run_folders, scalars, trained_weights
from tests.e2e import write_config as write_e2e_config
from training.loss import per_sample_loss


def half_transparent(path: Path, size: tuple[int, int] = (100, 50)) -> Path:
    """An RGBA image whose left half is opaque and right half transparent."""
    image = Image.new("RGBA", size, (200, 30, 30, 0))
    image.paste((200, 30, 30, 255), (0, 0, size[0] // 2, size[1]))
    image.save(path)
    return path


def test_the_alpha_mask_is_cropped_resized_and_flipped_with_its_image(tmp_path):
    path = half_transparent(tmp_path / "a.png")
    # a 100x50 image in a 64x64 bucket: the centre 50x50 (x 25..75) is kept; x < 50 is opaque
    mask = load_mask(path, (64, 64), flipped=False)
    assert mask.shape == (64, 64)
    assert mask[:, :30].min() == 1.0 and mask[:, 34:].max() == 0.0
    flipped = load_mask(path, (64, 64), flipped=True)
    assert torch.equal(flipped, mask.flip(-1))


def test_a_sidecar_wins_over_alpha_and_is_fitted_to_the_image(tmp_path):
    path = half_transparent(tmp_path / "a.png")
    sidecar = Image.new("L", (20, 10), 0)  # another size: stretched to the image's 100x50
    sidecar.paste(255, (15, 0, 20, 10))  # white on the right quarter (x 75..100 of the image)
    sidecar.save(tmp_path / f"a{MASK_SUFFIX}")
    mask = load_mask(path, (100, 50), flipped=False)  # the whole image, no crop
    assert mask[:, :70].max() == 0.0 and mask[:, 80:].min() == 1.0


def test_an_image_without_alpha_or_sidecar_is_all_white(tmp_path):
    path = write_image(tmp_path / "a.jpg", size=(40, 40))
    assert load_mask(path, (64, 64), flipped=False).min() == 1.0


def test_latent_masks_are_area_averages():
    mask = torch.zeros(16, 16)
    mask[:, :4] = 1.0
    small = latent_mask(mask, (2, 2))
    assert small.shape == (1, 2, 2)
    torch.testing.assert_close(small[0], torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


def test_mask_sidecars_are_not_training_images(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / f"a{MASK_SUFFIX}")
    write_image(tmp_path / f"B{MASK_SUFFIX.upper()}")
    assert [image.path.name for image in load(tmp_path).images] == ["a.png"]


def test_loss_weights_by_hand():
    scheduler = None  # not used without Min-SNR or debiased weights
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # one sample, one channel, 2x2
    target = torch.zeros_like(pred)
    weights = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    t = torch.tensor([0])
    mean = per_sample_loss(pred, target, t, scheduler, "mse", None, weights=weights)
    assert mean.item() == pytest.approx((1 * 1 + 0.5 * 9) / 4)
    normalized = per_sample_loss(
        pred, target, t, scheduler, "mse", None, weights=weights, normalize_weights=True
    )
    assert normalized.item() == pytest.approx((1 * 1 + 0.5 * 9) / 1.5)


def masked_data(root: Path, value: int) -> Path:
    """The bundled images with a mask sidecar of one grey ``value`` each."""
    shutil.copytree(EXAMPLE_DATA, root)
    for image in [p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg")]:
        with Image.open(image) as opened:
            size = opened.size
        Image.new("L", size, value).save(image.with_name(f"{image.stem}{MASK_SUFFIX}"))
    return root


NO_DECAY = {"base": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}}


@pytest.mark.slow
def test_all_black_masks_train_nothing_and_validate_to_zero(tmp_path):
    data = masked_data(tmp_path / "data", 0)
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"validate_training": True, "auto_split_proportion": 0.2}))
    keys = {"max_epochs": 1, "data_root": str(data), "masked_loss": True, "flip_p": 0.5}
    config = write_e2e_config(tmp_path / "run", NO_DECAY, validation_config=str(validation), **keys)
    assert run(config) == 0
    (last,) = checkpoints(tmp_path / "run", "last-")
    base = load_models("tiny-sd15")
    before = {f"unet.{k}": v for k, v in base.unet.state_dict().items()}
    text = standard_text_encoder_state_dict(base.text_encoder)
    before |= {f"text_encoder.{k}": v for k, v in text.items()}
    after = trained_weights(last)
    assert all(torch.equal(after[k], before[k]) for k in after), "a black mask trained"
    (folder,) = run_folders(tmp_path / "run")
    assert scalars(folder, "loss/val") and all(v == 0.0 for v in scalars(folder, "loss/val"))


@pytest.mark.slow
def test_all_white_masks_train_like_no_mask(tmp_path):
    data = masked_data(tmp_path / "data", 255)
    keys = {"max_epochs": 1, "data_root": str(data), "flip_p": 0.5}
    masked = write_e2e_config(tmp_path / "masked", NO_DECAY, masked_loss=True, **keys)
    plain = write_e2e_config(tmp_path / "plain", NO_DECAY, **keys)
    assert run(masked) == 0 and run(plain) == 0
    (a,) = checkpoints(tmp_path / "masked", "last-")
    (b,) = checkpoints(tmp_path / "plain", "last-")
    wa, wb = trained_weights(a), trained_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "a white mask changed training"
