"""The text-embedding cache of a frozen text encoder."""

from __future__ import annotations

import pytest
import torch

from models import load_models, tokenize
from tests.e2e import ADAMW, checkpoints, run, trained_weights, write_config
from training.step import PromptEncoder
from training.text_cache import CachedPromptEncoder


def test_each_caption_is_encoded_once_and_alone():
    bundle = load_models("tiny-sd15")
    encoder = PromptEncoder(bundle.text_encoder, 0)
    cached = CachedPromptEncoder(encoder)
    ids = tokenize(bundle.tokenizer, ["a red circle", "", "a red circle"])
    with torch.no_grad():
        first = cached(ids)
        again = cached(ids[:2])
        alone = torch.cat([encoder(ids[i : i + 1]) for i in range(3)])
    assert torch.equal(first, alone)  # each row as if encoded alone
    assert torch.equal(again, first[:2])
    assert (cached.misses, cached.hits) == (2, 3)  # two distinct captions


def test_the_cache_stops_growing_at_its_limit():
    bundle = load_models("tiny-sd15")
    cached = CachedPromptEncoder(PromptEncoder(bundle.text_encoder, 0), max_bytes=1)
    ids = tokenize(bundle.tokenizer, ["a", "a"])
    with torch.no_grad():
        cached(ids)
    assert cached.misses == 2  # nothing kept: encoded again


@pytest.mark.slow
def test_a_frozen_text_encoder_run_resumes_exactly(tmp_path):
    keys = {
        "max_epochs": 2,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
        "disable_textenc_training": True,
    }
    straight = write_config(tmp_path / "straight", ADAMW, **keys)
    assert run(straight) == 0
    (middle,) = checkpoints(tmp_path / "straight", "myproj-")
    resumed = write_config(tmp_path / "resumed", ADAMW, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (a,) = checkpoints(tmp_path / "straight", "last-")
    (b,) = checkpoints(tmp_path / "resumed", "last-")
    wa, wb = trained_weights(a), trained_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
