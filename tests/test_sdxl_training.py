"""SDXL's training rules that need no training run: crop conditioning, the resolution default,
the second encoder's optimizer values, base weights in bf16, the text-embedding cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from config.cli import parse_command_line
from config.errors import ConfigError, UserError
from config.load import load_train_config
from data.batch import Batch
from data.buckets import crop_offset
from data.images import load_fitted
from data.plan import build_plan
from data.scan import scan
from models import load_models
from optimizer.build import freeze_text_encoders
from optimizer.config import load_optimizer_config
from tests.e2e import EXAMPLE_DATA, run, write_config
from training.before_models import with_family_resolution
from training.build import build_trainings, data_settings
from training.precision import Precision
from training.samples import SampleBatch, SampleRequest, SamplingModel, generate_samples
from training.step import (
    CaptionTokenizer,
    PromptEncoder,
    encode_latent_distribution,
    size_conditioning,
)
from training.text_cache import CachedPromptEncoder


def loaded(tmp_path: Path, optimizer: dict | None = None, **keys):
    data = {"resume_ckpt": "tiny-sdxl", "data_root": str(EXAMPLE_DATA), **keys}
    if optimizer is not None:
        (tmp_path / "optimizer.json").write_text(json.dumps(optimizer))
        data["optimizer_config"] = str(tmp_path / "optimizer.json")
    (tmp_path / "train.json").write_text(json.dumps(data))
    return load_train_config(parse_command_line(["--config", str(tmp_path / "train.json")]))


def test_crop_offset_is_what_the_centred_crop_cuts_off():
    # 96x192 (w x h) into a 48x80 bucket: scaled by 0.5 to 48x96, 16 rows cut, 8 at the top
    assert crop_offset((96, 192), (48, 80), flipped=False) == (0, 8)
    # 300x100 into 64x64: scaled to 192x64, 128 columns cut, 64 on the left
    assert crop_offset((300, 100), (64, 64), flipped=False) == (64, 0)
    # an image that fits the bucket's aspect exactly is not cropped
    assert crop_offset((128, 64), (64, 32), flipped=True) == (0, 0)
    # flipped: the cut on the left is the unflipped image's cut on the right
    assert crop_offset((301, 100), (64, 64), flipped=True) == crop_offset(
        (301, 100), (64, 64), flipped=False
    )


def test_size_conditioning_of_a_batch_follows_the_pixels_trained(tmp_path):
    """The crop the time ids carry is the one `load_fitted` takes: the image scaled to cover the
    bucket, cut by ``crop`` on the left and at the top."""
    settings = data_settings(loaded(tmp_path, resolution=64), 555)
    images, _ = scan(settings)
    (plan, *_) = build_plan(images, settings, 0, 1)
    batch = Batch.of(0, plan)
    ids = size_conditioning(batch)
    assert ids.shape == (len(batch), 6)
    width, height = batch.bucket
    for row, item in zip(ids.tolist(), plan.items, strict=True):
        original = images[item.image_index].size
        assert row == [original[1], original[0], item.crop[1], item.crop[0], height, width]
        assert load_fitted(Path(item.path), batch.bucket).size == batch.bucket


def test_resolution_defaults_to_1024_for_sdxl_only(tmp_path):
    assert with_family_resolution(loaded(tmp_path)).config.resolution == 1024
    assert with_family_resolution(loaded(tmp_path, resolution=64)).config.resolution == 64
    sd = loaded(tmp_path, resume_ckpt="tiny-sd15")
    assert with_family_resolution(sd).config.resolution == 512


def test_text_encoder_2_overrides_make_the_second_encoders_group(tmp_path):
    optimizer = {
        "base": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01},
        "text_encoder_2_overrides": {"lr": 2e-5, "betas": [0.8, 0.9]},
    }
    train = loaded(tmp_path, optimizer)
    optim = load_optimizer_config(train)
    bundle = load_models("tiny-sdxl")
    freezing = freeze_text_encoders(optim, bundle, True, 0)
    assert [report.plan.num_layers for report in freezing] == [12, 32]
    # clip_skip 0: the first encoder's last layer and final norm make nothing SDXL uses
    assert freezing[0].plan.frozen_layers == (11,)
    assert freezing[0].plan.final_layer_norm_frozen
    assert not freezing[1].plan.final_layer_norm_frozen  # the pooled embedding goes through it
    _, text = build_trainings(bundle, optim, 10)
    assert text is not None
    first, second = text.optimizer.param_groups
    assert (first["lr"], first["betas"]) == (1e-4, (0.9, 0.999))
    assert (second["lr"], second["betas"], second["weight_decay"]) == (2e-5, (0.8, 0.9), 0.01)
    assert {id(p) for p in second["params"]} == {
        id(p) for p in bundle.text_encoder_2.parameters() if p.requires_grad
    }


def test_text_encoder_2_overrides_take_only_group_values(tmp_path):
    bad = {"base": {"optimizer": "adamw"}, "text_encoder_2_overrides": {"optimizer": "lion"}}
    with pytest.raises(ConfigError, match=r"text_encoder_2_overrides\.optimizer"):
        load_optimizer_config(loaded(tmp_path, bad))
    unused = {"base": {"optimizer": "adafactor"}, "text_encoder_2_overrides": {"betas": [0.9, 0.9]}}
    optim = load_optimizer_config(loaded(tmp_path, unused))
    bundle = load_models("tiny-sdxl")
    freeze_text_encoders(optim, bundle, True, 0)
    with pytest.raises(UserError, match="betas: not used by adafactor"):
        build_trainings(bundle, optim, 10)


BF16_LORA = {"lora_rank": 4, "lora_base_dtype": "bf16", "mixed_precision": "bf16"}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({**BF16_LORA, "lora_rank": 0}, "needs LoRA"),
        ({"lora_rank": 4, "lora_base_dtype": "bf16", "mixed_precision": "no"}, "mixed_precision"),
        (
            {
                "lora_rank": 4,
                "lora_base_dtype": "bf16",
                "mixed_precision": "bf16",
                "lora_merge": True,
            },
            "lora_merge",
        ),
    ],
)
def test_lora_base_dtype_rules(tmp_path, keys, message, caplog):
    config = write_config(tmp_path, None, resume_ckpt="tiny-sdxl", **keys)
    assert run(config, "--dry_run") == 2
    assert message in caplog.text


def test_the_text_embedding_cache_keeps_sdxls_pooled_embedding():
    bundle = load_models("tiny-sdxl")
    encoder = PromptEncoder.of(bundle, 0)
    cached = CachedPromptEncoder(encoder)
    ids = CaptionTokenizer.of(bundle)(["a red circle", "", "a red circle"])
    assert ids.shape == (3, 2, 77)
    with torch.no_grad():
        first = cached(ids)
        alone = [encoder(ids[i : i + 1]) for i in range(3)]
    assert first.pooled is not None and first.pooled.shape == (3, 40)
    assert torch.equal(first.embeds, torch.cat([a.embeds for a in alone]))
    assert torch.equal(first.pooled, torch.cat([a.pooled for a in alone]))
    assert (cached.misses, cached.hits) == (2, 1)


def _autocast_seen(module: torch.nn.Module, method: str) -> list[bool]:
    """Whether CPU autocast was on each time ``module.<method>`` ran."""
    seen: list[bool] = []
    original = getattr(module, method)

    def wrapped(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    setattr(module, method, wrapped)
    return seen


@pytest.mark.parametrize(("name", "fp32"), [("tiny-sdxl", True), ("tiny-sd15", False)])
def test_sdxls_vae_encodes_in_fp32_under_an_fp16_autocast(name, fp32):
    bundle = load_models(name)
    seen = _autocast_seen(bundle.vae, "encode")
    pixels = torch.zeros(1, 3, 64, 64)
    dist = encode_latent_distribution(bundle, pixels, Precision("cpu", torch.float16))
    assert seen == [not fp32]
    assert torch.isfinite(dist.mean).all()


def test_sdxl_samples_decode_in_fp32_under_an_fp16_autocast(tmp_path):
    bundle = load_models("tiny-sdxl")
    seen = _autocast_seen(bundle.vae, "decode")
    model = SamplingModel(
        bundle, torch.device("cpu"), autocast=Precision("cpu", torch.float16).autocast
    )
    size = {"width": 64, "height": 64}
    request = SampleRequest(prompt="a red circle", seed=1, num_inference_steps=2, **size)
    (path,) = generate_samples(model, SampleBatch([request], tmp_path, 1))
    assert seen == [False]
    assert path.exists()
