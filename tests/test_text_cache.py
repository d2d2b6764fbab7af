"""The text-embedding cache of a frozen text encoder."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from models import load_models, tokenize
from tests.e2e import ADAMW, checkpoints, run, trained_weights, write_config
from training.step import PromptEncoder
from training.text_cache import CachedPromptEncoder, text_encoder_on


def test_each_caption_is_encoded_once_and_alone():
    bundle = load_models("tiny-sd15")
    encoder = PromptEncoder(bundle.text_encoder, 0)
    cached = CachedPromptEncoder(encoder)
    ids = tokenize(bundle.tokenizer, ["a red circle", "", "a red circle"])
    with torch.no_grad():
        first = cached(ids).embeds
        again = cached(ids[:2]).embeds
        alone = torch.cat([encoder(ids[i : i + 1]).embeds for i in range(3)])
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
    # The offload changes where the encoder waits, not what it computes.
    straight = write_config(tmp_path / "straight", ADAMW, **keys, text_encoder_offload=True)
    assert run(straight) == 0
    (middle,) = checkpoints(tmp_path / "straight", "myproj-")
    resumed = write_config(tmp_path / "resumed", ADAMW, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (a,) = checkpoints(tmp_path / "straight", "last-")
    (b,) = checkpoints(tmp_path / "resumed", "last-")
    wa, wb = trained_weights(a), trained_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _Moves(torch.nn.Module):
    """A module that records where it is sent (a second device without a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.where = torch.device("cpu")
        self.moves: list[str] = []

    def parameters(self, recurse: bool = True):
        yield torch.empty(0, device="meta") if self.where.type == "meta" else self.weight

    def to(self, device):
        self.where = torch.device(device)
        self.moves.append(str(device))
        return self


def test_an_offloaded_encoder_comes_to_the_device_for_a_pass_and_goes_back():
    module = _Moves()
    with text_encoder_on(module, torch.device("meta")):
        assert module.moves == ["meta"]
    assert module.moves == ["meta", "cpu"]
    with text_encoder_on(module, torch.device("cpu")):  # already there: nothing moves
        pass
    assert module.moves == ["meta", "cpu"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"shuffle_tags": True}, "text_encoder_offload: needs the text-embedding cache"),
        ({}, "text_encoder_offload: the text encoder trains"),
    ],
)
def test_text_encoder_offload_needs_a_frozen_encoder_and_the_cache(tmp_path, caplog, keys, message):
    config = write_config(tmp_path, text_encoder_offload=True, **keys)
    assert run(config, "--dry_run") == 2
    assert message in caplog.text


def test_the_dry_run_counts_an_offloaded_encoder_outside_the_device(tmp_path, capsys):
    keys = {"disable_textenc_training": True}
    reports = []
    for offload in (False, True):
        config = write_config(tmp_path / str(offload), text_encoder_offload=offload, **keys)
        assert run(config, "--dry_run") == 0
        reports.append(json.loads(capsys.readouterr().out)["memory"])
    kept, offloaded = reports
    assert offloaded["text_encoder"]["counted_in_total"] is False
    te = kept["text_encoder"]["total_bytes"]
    assert kept["total_bytes"] - offloaded["total_bytes"] == te > 0


@pytest.mark.gpu
def test_an_offloaded_encoder_is_in_cpu_memory_while_training_on_cuda(tmp_path, caplog):
    config = write_config(
        tmp_path, ADAMW, max_epochs=1, disable_textenc_training=True, text_encoder_offload=True
    )
    # The models are prepared before the run's log file raises the root logger to INFO.
    caplog.set_level(logging.INFO, logger="training.text_cache")
    assert run(config) == 0
    assert "waits in CPU memory instead of cuda:0" in caplog.text
