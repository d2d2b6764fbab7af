"""train.py for real on tiny models: training, checkpoints, exact resume, interrupts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from models.text_keys import standard_text_encoder_state_dict
from tests.e2e import (
    ADAMW,
    REPO,
    checkpoints,
    run,
    run_folders,
    run_subprocess,
    scalars,
    trained_weights,
    write_config,
)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
def test_loss_is_finite_and_decreases(tmp_path, model):
    optimizer = {"base": {"optimizer": "adamw", "lr": 1e-3}}
    config = write_config(
        tmp_path,
        optimizer,
        resume_ckpt=model,
        max_epochs=3,
        log_step=7,
        cond_dropout=0.0,
        flip_p=0.0,
    )
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    losses = scalars(folder, "loss/train")  # one average per epoch
    assert len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
def test_run_folder_has_config_events_and_a_loadable_checkpoint(tmp_path, model):
    config = write_config(tmp_path, ADAMW, max_epochs=1, resume_ckpt=model)
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    resolved = json.loads((folder / "config.json").read_text())
    assert resolved["sources"]["unet.lr"] == "train.json"
    assert resolved["unet"]["optimizer"] == "adamw"
    assert list(folder.glob("events.out.tfevents.*"))
    assert scalars(folder, "lr/unet")[0] == pytest.approx(1e-4)
    assert scalars(folder, "lr/text_encoder")[0] == pytest.approx(1e-4)
    (last,) = checkpoints(tmp_path, "last-")
    pipe = StableDiffusionPipeline.from_pretrained(last)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.slow
def test_training_changes_weights_but_not_frozen_layers(tmp_path):
    freezing = {"freeze_embeddings": True, "freeze_front_n_layers": -6}
    config = write_config(
        tmp_path,
        {**ADAMW, "text_encoder_freezing": freezing},
        resume_ckpt="tiny-sd21",
        max_epochs=1,
        save_full_precision=True,
    )
    assert run(config) == 0
    (last,) = checkpoints(tmp_path, "last-")
    from models import load_models

    before = load_models("tiny-sd21")
    after = load_file(last / "text_encoder" / "model.safetensors")
    original = standard_text_encoder_state_dict(before.text_encoder)  # the keys checkpoints have
    for key, value in after.items():
        layer = key.split("layers.")[1].split(".")[0] if "layers." in key else None
        frozen = "embeddings" in key or (layer is not None and int(layer) < 17)
        assert torch.equal(value, original[key]) == frozen, key
    unet_after = load_file(last / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(v, before.unet.state_dict()[k]) for k, v in unet_after.items())


@pytest.mark.slow
def test_disable_textenc_training_leaves_text_encoder_unchanged(tmp_path):
    config = write_config(
        tmp_path, ADAMW, max_epochs=1, disable_textenc_training=True, save_full_precision=True
    )
    assert run(config) == 0
    (last,) = checkpoints(tmp_path, "last-")
    from models import load_models

    before = standard_text_encoder_state_dict(load_models("tiny-sd15").text_encoder)
    after = load_file(last / "text_encoder" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in after)
    state = json.loads((last / "training_state" / "state.json").read_text())
    assert state["fingerprint"]["text_encoder"] is None


@pytest.mark.parametrize(
    "optimizer",
    [
        "adamw",
        "adamw8bit",
        "lion",
        "lion8bit",
        "dadapt_adam",
        "dadapt_lion",
        "dadapt_sgd",
        "prodigy",
    ],
)
@pytest.mark.slow
def test_every_optimizer_trains_end_to_end(tmp_path, optimizer):
    adaptive = optimizer.startswith("dadapt") or optimizer == "prodigy"
    lr = 1.0 if adaptive else 1e-4
    config = write_config(
        tmp_path,
        {"base": {"optimizer": optimizer, "lr": lr, "weight_decay": 0.01}},
        max_epochs=1,
        lr=None,
    )
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    assert all(torch.isfinite(torch.tensor(scalars(folder, "loss/train"))))
    (last,) = checkpoints(tmp_path, "last-")
    state = json.loads((last / "training_state" / "state.json").read_text())
    assert state["fingerprint"]["unet"]["optimizer"] == optimizer


@pytest.mark.slow
def test_two_n_steps_equal_n_plus_resume_plus_n(tmp_path):
    """Exact resume at an epoch boundary, with accumulation and a warm-up/cosine schedule."""
    optimizer = {"base": {"optimizer": "adamw8bit", "lr": 1e-4, "lr_scheduler": "cosine"}}
    keys = {
        "max_epochs": 2,
        "grad_accum": 2,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
        "shuffle_tags": True,
        "zero_frequency_noise_ratio": 0.1,
    }
    straight = write_config(tmp_path / "straight", optimizer, **keys)
    assert run(straight) == 0
    (middle,) = checkpoints(tmp_path / "straight", "myproj-")
    assert "ep01" in middle.name
    resumed = write_config(tmp_path / "resumed", optimizer, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (full,) = checkpoints(tmp_path / "straight", "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    assert full.name == continued.name
    a, b = trained_weights(full), trained_weights(continued)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the straight run"


@pytest.mark.slow
def test_resume_from_plain_weights_starts_a_new_run(tmp_path):
    first = write_config(tmp_path / "first", ADAMW, max_epochs=1)
    assert run(first) == 0
    (last,) = checkpoints(tmp_path / "first", "last-")
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(last, plain, ignore=shutil.ignore_patterns("training_state"))
    second = write_config(tmp_path / "second", ADAMW, max_epochs=1, resume_ckpt=str(plain))
    assert run(second) == 0
    (folder,) = run_folders(tmp_path / "second")
    assert len(scalars(folder, "loss/train")) == 7  # a whole new epoch from step 0


@pytest.mark.slow
def test_resume_with_another_optimizer_is_an_error(tmp_path):
    first = write_config(tmp_path / "first", ADAMW, max_epochs=1)
    assert run(first) == 0
    (last,) = checkpoints(tmp_path / "first", "last-")
    lion = {"base": {"optimizer": "lion", "lr": 1e-5}}
    second = write_config(tmp_path / "second", lion, resume_ckpt=str(last))
    assert run(second) == 2


SIGNALLING_PLUGIN = """
import os, signal
from plugins.plugins import BasePlugin


class Interrupt(BasePlugin):
    def on_step_end(self, **kwargs):
        if (kwargs["epoch"], kwargs["local_step"]) == (0, 4):  # the middle of a window
            os.kill(os.getpid(), signal.SIGINT)
"""


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint_that_resumes_exactly(tmp_path):
    """Ctrl-C mid-window: the window is finished, an exact resume point is saved, exit 0."""
    keys = {"max_epochs": 2, "grad_accum": 3, "log_step": 1}
    straight = write_config(tmp_path / "straight", ADAMW, **keys)
    interrupted = write_config(
        tmp_path / "interrupted", ADAMW, **keys, plugins=["sigint_plugin.Interrupt"]
    )
    (tmp_path / "interrupted" / "sigint_plugin.py").write_text(SIGNALLING_PLUGIN)
    assert run(interrupted) == 0
    (saved,) = checkpoints(tmp_path / "interrupted", "interrupted-")
    assert saved.name == "interrupted-myproj-ep00-gs00002"  # after the window of batches 3-5
    assert (saved / "training_state" / "state.json").exists()
    assert StableDiffusionPipeline.from_pretrained(saved) is not None

    resumed = write_config(tmp_path / "resumed", ADAMW, **keys, resume_ckpt=str(saved))
    assert run(resumed) == 0
    assert run(straight) == 0
    (full,) = checkpoints(tmp_path / "straight", "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    a, b = trained_weights(full), trained_weights(continued)
    assert all(torch.equal(a[k], b[k]) for k in a), "interrupted + resumed differs"


@pytest.mark.slow
def test_periodic_checkpoints_follow_the_keys(tmp_path):
    config = write_config(
        tmp_path,
        ADAMW,
        max_epochs=4,
        save_every_n_epochs=1,
        save_ckpts_from_n_epochs=2,
        project_name="proj",
        no_prepend_last=True,
    )
    assert run(config) == 0
    names = [p.name for p in checkpoints(tmp_path)]
    assert names == ["proj-ep02-gs00014", "proj-ep03-gs00021", "proj-ep04-gs00028"]
    periodic = checkpoints(tmp_path)[0]
    assert not (periodic / "training_state").exists()  # save_optimizer false
    assert (checkpoints(tmp_path)[-1] / "training_state").exists()  # the final one always


@pytest.mark.slow
def test_save_ckpt_dir_and_unwritable_target(tmp_path, caplog):
    config = write_config(tmp_path, ADAMW, max_epochs=1, save_ckpt_dir=str(tmp_path / "ckpts"))
    assert run(config) == 0
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["last-myproj-ep01-gs00007", "last-myproj-ep01-gs00007.safetensors"]
    (tmp_path / "afile").write_text("x")
    config = write_config(
        tmp_path / "b", ADAMW, max_epochs=1, save_ckpt_dir=str(tmp_path / "afile" / "ckpts")
    )
    assert run(config) == 2
    assert "afile" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import training.loop as loop

    real = loop.batch_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] > 4 else loss

    monkeypatch.setattr(loop, "batch_loss", sometimes_nan)
    config = write_config(tmp_path, ADAMW, max_epochs=3)
    assert run(config) == 1
    (saved,) = checkpoints(tmp_path, "diverged-")
    state = json.loads((saved / "training_state" / "state.json").read_text())
    # Saved at the start of the window that diverged (batch 6 of the second epoch): the
    # checkpoint is an exact resume point, before that window's non-finite loss.
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 6)
    assert state["counters"]["nonfinite_losses"] == loop.MAX_CONSECUTIVE_NONFINITE
    weights = trained_weights(saved)
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_sample_images_are_made_during_training(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    config = write_config(
        tmp_path, ADAMW, max_epochs=1, sample_prompts=str(prompts), sample_steps=7
    )
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    images = sorted(p.name for p in (folder / "samples").glob("*.png"))
    # each prompt at EveryDream2's guidance scales 7, 4 and 1.01
    assert images == [f"step-000007-0{i}.png" for i in range(6)]


@pytest.mark.slow
def test_write_schedule(tmp_path):
    config = write_config(tmp_path, ADAMW, max_epochs=2, write_schedule=True)
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    assert sorted(p.name for p in folder.glob("schedule-*")) == [
        "schedule-ep001.txt",
        "schedule-ep002.txt",
    ]


@pytest.mark.slow
def test_cache_latents_skips_the_vae_and_trains_alike(tmp_path, monkeypatch):
    """Cached posteriors give the same draws as the VAE in the step (up to float rounding)."""
    keys = {"max_epochs": 2, "save_full_precision": True}
    plain = write_config(tmp_path / "plain", ADAMW, **keys)
    cached = write_config(tmp_path / "cached", ADAMW, **keys, cache_latents=True)
    assert run(plain) == 0

    import training.sources as sources

    def no_vae_in_step(*args, **kwargs):
        raise AssertionError("the VAE ran in the step although latents are cached")

    monkeypatch.setattr(sources, "encode_latent_distribution", no_vae_in_step)
    monkeypatch.setattr(sources, "make_loader", no_vae_in_step)
    assert run(cached) == 0
    (a,) = checkpoints(tmp_path / "plain", "last-")
    (b,) = checkpoints(tmp_path / "cached", "last-")
    from models import load_models

    start = load_models("tiny-sd15")
    w0 = {f"unet.{k}": v for k, v in start.unet.state_dict().items()}
    text = standard_text_encoder_state_dict(start.text_encoder)
    w0 |= {f"text_encoder.{k}": v for k, v in text.items()}
    wa, wb = trained_weights(a), trained_weights(b)
    difference = sum((wa[k] - wb[k]).norm() ** 2 for k in wa) ** 0.5
    change = sum((wa[k] - w0[k]).norm() ** 2 for k in wa) ** 0.5
    assert difference < 0.02 * change  # float rounding only (measured: 0.4%)


@pytest.mark.slow
def test_every_step_option_together_on_v_prediction(tmp_path):
    config = write_config(
        tmp_path,
        ADAMW,
        resume_ckpt="tiny-sd21",
        max_epochs=2,
        clip_skip=2,
        min_snr_gamma=5.0,
        enable_zero_terminal_snr=True,
        pyramid_noise_discount=0.4,
        loss_type="mse_huber",
        embedding_perturbation=0.1,
        gradient_checkpointing=True,
        attn_type="slice",
        timestep_start=100,
        timestep_end=900,
        debiased_estimation=True,
        input_perturbation=0.1,
        grad_accum=3,
        clip_grad_norm=0.5,
        shuffle_tags=True,
        keep_tags=1,
    )
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    losses = scalars(folder, "loss/train")
    assert len(losses) == 2 * 3  # 7 batches per epoch in windows of 3, 3, 1
    assert all(torch.isfinite(torch.tensor(losses)))
    resolved = json.loads((folder / "config.json").read_text())
    assert resolved["text_encoder_freezing"]["frozen_layers"] == [22]  # unused with clip_skip 2
    assert scalars(folder, "grad_norm/unet")


@pytest.mark.gpu
@pytest.mark.parametrize("disable_amp", [False, True])
def test_trains_on_cuda(tmp_path, disable_amp):
    config = write_config(
        tmp_path,
        {"base": {"optimizer": "adamw8bit", "lr": 1e-4}},
        max_epochs=1,
        disable_amp=disable_amp,
    )
    result = run_subprocess(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on CUDA device 0" in result.stderr
    (folder,) = run_folders(tmp_path)
    assert all(torch.isfinite(torch.tensor(scalars(folder, "loss/train"))))


@pytest.mark.slow
def test_checkpoint_every_n_minutes(tmp_path):
    config = write_config(tmp_path, ADAMW, max_epochs=1, ckpt_every_n_minutes=1e-9)
    assert run(config) == 0
    names = [p.name for p in checkpoints(tmp_path)]
    # The one at the end of the epoch is at epoch 1 (resumable: the epoch is complete).
    periodic = [f"myproj-ep00-gs{step:05d}" for step in range(1, 7)] + ["myproj-ep01-gs00007"]
    assert names == ["last-myproj-ep01-gs00007", *periodic]


@pytest.mark.slow
def test_resume_warns_when_the_data_changed(tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / "examples" / "data", data)
    first = write_config(tmp_path / "first", ADAMW, max_epochs=1, data_root=str(data))
    assert run(first) == 0
    (last,) = checkpoints(tmp_path / "first", "last-")
    (data / "img_003.txt").write_text("a new caption")
    second = write_config(
        tmp_path / "second", ADAMW, max_epochs=2, data_root=str(data), resume_ckpt=str(last)
    )
    assert run(second) == 0
    assert "training data or its settings changed" in caplog.text
