"""fused_backward_pass: parameters stepped in backward equal the ordinary step, resume exactly."""

from __future__ import annotations

import pytest
import torch

from optimizer.fused import FusedBackward
from tests.e2e import checkpoints, run, trained_weights, write_config


def test_parameters_step_in_backward_only_when_armed_and_their_gradients_go():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    twin.load_state_dict(model.state_dict())
    fused = FusedBackward(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=0.1), lr=0.1)
    plain = torch.optim.AdamW(twin.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    model(x).sum().backward()  # not armed: gradients accumulate, nothing steps
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    with fused.armed():
        model(x).sum().backward()  # the window's last batch: steps, frees the gradients
    assert all(p.grad is None for p in model.parameters())
    twin(x).sum().backward()
    twin(x).sum().backward()
    plain.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def runs_of(tmp_path, name: str, **keys):
    optimizer = {"base": {"optimizer": name, "lr": 1e-3, "lr_scheduler": "cosine"}}
    common = {"max_epochs": 2, "grad_accum": 2, "save_every_n_epochs": 1, "save_optimizer": True}
    fused = write_config(tmp_path / "fused", optimizer, fused_backward_pass=True, **common, **keys)
    plain = write_config(tmp_path / "plain", optimizer, **common, **keys)
    assert run(fused) == 0 and run(plain) == 0
    return optimizer, common


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_a_fused_run_equals_the_ordinary_run_and_resumes_exactly(tmp_path, name):
    optimizer, common = runs_of(tmp_path, name)
    (a,) = checkpoints(tmp_path / "fused", "last-")
    (b,) = checkpoints(tmp_path / "plain", "last-")
    wa, wb = trained_weights(a), trained_weights(b)
    for key in wa:  # the same math, one tensor at a time: float rounding at most
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    (middle,) = checkpoints(tmp_path / "fused", "myproj-")
    resumed = write_config(
        tmp_path / "resumed",
        optimizer,
        fused_backward_pass=True,
        resume_ckpt=str(middle),
        **common,
    )
    assert run(resumed) == 0
    (c,) = checkpoints(tmp_path / "resumed", "last-")
    wc = trained_weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa), "the resumed fused run differs"


@pytest.mark.parametrize(
    ("keys", "optimizer", "message"),
    [
        ({"clip_grad_norm": 1.0}, "adamw", "cannot clip gradients"),
        ({"mixed_precision": "fp16"}, "adamw", "mixed_precision fp16"),
        ({}, "prodigy", "reads every parameter in its step"),
    ],
)
def test_what_fused_backward_cannot_do_is_refused(tmp_path, caplog, keys, optimizer, message):
    config = write_config(
        tmp_path, {"base": {"optimizer": optimizer}}, fused_backward_pass=True, **keys
    )
    assert run(config) == 2
    assert message in caplog.text
