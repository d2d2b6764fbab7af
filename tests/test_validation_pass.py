"""One validation pass: the same number every time, independent of the number of processes, and
nothing of the training's state touched (RNG, modes, gradients, weights)."""

from __future__ import annotations

import json

import pytest
import torch

import training.validation.evaluate as evaluate
from config.cli import parse_command_line
from config.live import LiveSettings
from tests.e2e import EXAMPLE_DATA, write_config
from training.build import build_from_command_line
from training.precision import choose_precision
from training.session import prepare_models
from training.step import Shard
from training.validation.evaluate import Evaluator


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pass")
    validation = folder / "validation.json"
    validation.write_text(
        json.dumps(
            {
                "val_split_mode": "manual",
                "manual_data_root": str(EXAMPLE_DATA),
                "batch_size": 3,
                "stabilize_training_loss": True,
            }
        )
    )
    config = write_config(
        folder,
        validation_config=str(validation),
        pyramid_noise_discount=0.1,
        min_snr_gamma=5.0,
        embedding_perturbation=0.1,
    )
    run, accelerator = build_from_command_line(parse_command_line(["--config", str(config)]))
    models = prepare_models(run, accelerator)
    precision = choose_precision(run.device, "no", disable_amp=True)
    assert run.validation is not None
    return run, models, precision


def evaluator(built, shard: Shard | None = None) -> Evaluator:
    run, models, precision = built
    shard = Shard() if shard is None else shard
    return Evaluator(models, run.train.config.clip_skip, precision, run.device, shard, False)


def settings(built) -> LiveSettings:
    return LiveSettings.of(built[0].train.config)


def test_a_pass_repeats_exactly_and_leaves_the_training_state_alone(built):
    run = built[0]
    val, stabilized = run.validation.sets
    assert len(val.plans) > 2  # several batches, some short
    generator = torch.Generator().manual_seed(1)
    rng, gen = torch.get_rng_state(), generator.get_state()
    weights = {k: v.clone() for k, v in run.models.unet.state_dict().items()}
    run.models.text_encoder.train(True)
    list(run.models.text_encoder.modules())[3].eval()  # a mixed state is restored too
    modes = [m.training for m in run.models.text_encoder.modules()]
    first = evaluator(built).loss(val, settings(built))
    second = evaluator(built).loss(val, settings(built))
    evaluator(built).loss(stabilized, settings(built))  # other passes in between change nothing
    assert evaluator(built).loss(val, settings(built)) == first == second
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), gen)
    assert [m.training for m in run.models.text_encoder.modules()] == modes
    assert run.models.unet.training
    assert all(p.grad is None for p in run.models.unet.parameters())
    after = run.models.unet.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_processes_share_the_batches_and_get_the_single_process_mean(built, monkeypatch):
    """Each process takes batches i ≡ rank (mod processes); summing their (loss, images) pairs
    gives the one-process value: the draws of a batch do not depend on who evaluates it."""
    val = built[0].validation.sets[0]
    single = evaluator(built).loss(val, settings(built))
    sums: list[torch.Tensor] = []

    def keep(values: torch.Tensor) -> torch.Tensor:
        sums.append(values)
        return values

    monkeypatch.setattr(evaluate, "sum_over_processes", keep)
    for rank in range(2):
        evaluator(built, Shard(rank, 2)).loss(val, settings(built))
    total = sums[0] + sums[1]
    assert sums[0][1] > 0 and sums[1][1] > 0
    assert float(total[0] / total[1]) == pytest.approx(single, rel=1e-12)


def test_cached_latents_give_the_same_loss(built):
    val = built[0].validation.sets[0]
    plain = evaluator(built).loss(val, settings(built))
    cached = evaluator(built)
    cached.cache_latents([val])
    assert cached.loss(val, settings(built)) == pytest.approx(plain, rel=1e-5)


def test_the_loss_is_mse_without_the_training_extras(built):
    run, _, _ = built
    config = evaluate.evaluation_settings(LiveSettings.of(run.train.config))
    assert config.min_snr_gamma is None and config.embedding_perturbation == 0.0
    assert config.zero_frequency_noise_ratio == 0.0 and config.loss_type == "mse"
    assert config.pyramid_noise_discount == 0.1  # the training's noise otherwise
