"""Schedule-free AdamW: evaluation weights for samples, validation and saves; exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from models import load_models
from optimizer.schedule_free import evaluation_weights
from tests.e2e import checkpoints, quick_prompts, run, run_folders, trained_weights, write_config
from training.checkpointing.state import load_training_state

SCHEDULE_FREE = {"base": {"optimizer": "adamw_schedulefree", "lr": 1e-3}}


def stepped():
    import schedulefree

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.1)
    optimizer.train()
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_evaluation_weights_are_evals_and_training_resumes_bit_for_bit():
    model, optimizer = stepped()
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    twin_optimizer.eval()  # what the optimizer's own eval() gives
    train_weights = [p.detach().clone() for p in model.parameters()]
    with evaluation_weights([optimizer]):
        for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
            assert torch.equal(p, q)
        assert not all(
            torch.equal(p, t) for p, t in zip(model.parameters(), train_weights, strict=True)
        )
    for p, t in zip(model.parameters(), train_weights, strict=True):
        assert torch.equal(p, t)  # exactly, not through train()'s rounding
    assert optimizer.param_groups[0]["train_mode"]


def test_other_optimizers_are_left_alone():
    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with evaluation_weights([torch.optim.AdamW(model.parameters())]):
        pass
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.slow
def test_saves_samples_and_validation_use_the_evaluation_weights_and_resume_is_exact(tmp_path):
    keys = {
        "max_epochs": 2,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
        "save_full_precision": True,
        "sample_prompts": quick_prompts(tmp_path),
        "sample_steps": 5,
    }
    straight = write_config(tmp_path / "straight", SCHEDULE_FREE, **keys)
    assert run(straight) == 0
    (middle,) = checkpoints(tmp_path / "straight", "myproj-")
    resumed = write_config(tmp_path / "resumed", SCHEDULE_FREE, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (full,) = checkpoints(tmp_path / "straight", "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    saved, again = trained_weights(full), trained_weights(continued)
    assert all(torch.equal(saved[k], again[k]) for k in saved), "the resumed run differs"
    # The saved weights are x = lerp(y, z, 1 - 1/beta1), not the training weights y.
    state = load_training_state(full)
    y = state.components["schedule_free"]["unet"]
    z = [s["z"] for s in state.optimizers["unet"]["state"].values()]
    x = [torch.lerp(a, b, 1 - 1 / 0.9) for a, b in zip(y, z, strict=True)]
    names = [name for name, _ in load_models("tiny-sd15").unet.named_parameters()]
    assert len(names) == len(x)
    assert any(not torch.equal(a, b) for a, b in zip(y, x, strict=True))
    for name, tensor in zip(names, x, strict=True):
        torch.testing.assert_close(saved[f"unet.{name}"], tensor)
    (folder,) = run_folders(tmp_path / "straight")
    assert list((folder / "samples").glob("*.png"))
