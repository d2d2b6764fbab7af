"""Checkpoints: pipeline folder, training state, exact weights, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import signal
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import prodigyopt
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from safetensors import safe_open

import models.copies as copies
import storage.atomic as atomic
import training.checkpointing.writer as checkpoint
from config.errors import UserError
from models import ModelBundle, load_models
from tests.e2e import assert_same_weights
from training.checkpointing.state import (
    STATE_DIR,
    TrainingState,
    check_fingerprint,
    has_training_state,
    load_training_state,
)
from training.checkpointing.writer import (
    SaveOptions,
    frozen_weights_reference,
    restore_full_precision_weights,
    save_checkpoint,
)

COMPONENTS = ("unet", "text_encoder", "vae")


@pytest.fixture(scope="module")
def sd15() -> ModelBundle:
    return load_models("tiny-sd15")


@pytest.fixture(scope="module")
def sd21() -> ModelBundle:
    return load_models("tiny-sd21")


def weights(bundle: ModelBundle) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.detach().clone() for k, v in getattr(bundle, name).state_dict().items()}
        for name in COMPONENTS
    }


def assert_same(a, b, where: str = "") -> None:
    """Recursive exact equality; tensors must match in dtype and every bit."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def fake_grads(parameters: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator)


def make_training(model: torch.nn.Module, kind: str, max_values: int | None = 100_000):
    """A real optimizer of ``kind`` over copies of ``model``'s parameters, stepped twice.

    By default the first parameters up to ~100k values (tensors of ≥4096 values get 8-bit
    state): the whole tiny UNet would make bitsandbytes' slow CPU step dominate the test time.
    """
    parameters, size = [], 0
    for p in model.parameters():
        if max_values is not None and size > max_values:
            break
        parameters.append(torch.nn.Parameter(p.detach().clone()))
        size += p.numel()
    builders = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "adamw8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3),
        "prodigy": lambda ps: prodigyopt.Prodigy(ps, lr=1.0),
    }
    optimizer = builders[kind](parameters)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    for step in range(2):
        fake_grads(parameters, step)
        optimizer.step()
        scheduler.step()
    return parameters, optimizer, scheduler, lambda ps: builders[kind](ps)


def make_state(
    bundle: ModelBundle,
    kinds: dict[str, str],
    global_step: int = 7,
    max_values: int | None = 100_000,
) -> tuple:
    trainings = {
        name: make_training(getattr(bundle, name), kind, max_values) for name, kind in kinds.items()
    }
    state = TrainingState(
        epoch=2,
        batch_in_epoch=3,
        global_step=global_step,
        seed=1234,
        optimizers={name: t[1].state_dict() for name, t in trainings.items()},
        schedulers={name: t[2].state_dict() for name, t in trainings.items()},
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict(),
        rng={
            "generator": torch.Generator().manual_seed(5).get_state(),
            "torch_cpu": torch.get_rng_state(),
            "cuda": None,
            "python": random.Random(9).getstate(),
        },
        fingerprint={
            name: {"optimizer": kinds[name], "trainable_parameters": 10 + i}
            if name in kinds
            else None
            for i, name in enumerate(("unet", "text_encoder"))
        },
        counters={"nonfinite_losses": 1, "images_seen": 48, "elapsed_seconds": 2.5},
    )
    return state, trainings


def on_disk_dtypes(file: Path) -> set[torch.dtype]:
    with safe_open(str(file), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118


# --- the pipeline folder --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd15", "sd21"])
@pytest.mark.parametrize("full_precision", [False, True])
def test_pipeline_folder_loads_and_makes_an_image(request, tmp_path, model, full_precision):
    bundle = request.getfixturevalue(model)
    before = weights(bundle)
    path = save_checkpoint(
        tmp_path / "ckpt", bundle, None, SaveOptions(full_precision=full_precision)
    )
    assert path == tmp_path / "ckpt"
    assert not has_training_state(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left

    dtype = torch.float32 if full_precision else torch.float16
    assert on_disk_dtypes(path / "unet" / "diffusion_pytorch_model.safetensors") == {dtype}
    assert on_disk_dtypes(path / "vae" / "diffusion_pytorch_model.safetensors") == {dtype}
    assert on_disk_dtypes(path / "text_encoder" / "model.safetensors") == {dtype}

    pipeline = StableDiffusionPipeline.from_pretrained(str(path))
    assert pipeline.safety_checker is None
    assert {getattr(pipeline, n).dtype for n in COMPONENTS} == {torch.float32}
    assert pipeline.scheduler.config.prediction_type == bundle.prediction_type
    if not full_precision:  # fp16 files: the components must still load in one dtype
        image = pipeline(
            "a photo",
            num_inference_steps=1,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert image.shape == (1, 64, 64, 3)
        assert np.isfinite(image).all()

    loaded = load_models(str(path))
    assert loaded.prediction_type == bundle.prediction_type
    assert loaded.tokenizer("a photo").input_ids == bundle.tokenizer("a photo").input_ids
    for name in COMPONENTS:
        for key, original in before[name].items():
            value = getattr(loaded, name).state_dict()[key]
            assert value.dtype == torch.float32
            assert torch.equal(value, original.to(dtype).float()), f"{name}.{key}"


def test_fp16_writes_of_two_models_of_one_configuration_hold_each_ones_weights(tmp_path):
    """The fp16 copies' empty modules are reused from write to write; their tensors are not:
    each file holds its own model's weights, and no copy keeps tensors after its write."""
    first, second = load_models("tiny-sd15"), load_models("tiny-sd15")
    with torch.no_grad():
        for p in second.unet.parameters():
            p.add_(1.0)
    for index, bundle in enumerate((first, second, first)):
        path = save_checkpoint(tmp_path / str(index), bundle, None)
        loaded = load_models(str(path))
        for name in COMPONENTS:
            assert_same_weights(getattr(bundle, name), getattr(loaded, name), fp16=True)
    for spare in copies._SPARES.values():
        assert all(t.is_meta for t in spare.state_dict().values())


def test_saving_leaves_the_models_as_they_were(sd15, tmp_path):
    before = weights(sd15)
    parameters = {name: list(getattr(sd15, name).parameters()) for name in COMPONENTS}
    state, _ = make_state(sd15, {"unet": "adamw"})
    save_checkpoint(tmp_path / "a", sd15, state)
    save_checkpoint(tmp_path / "b", sd15, state, SaveOptions(full_precision=True))
    for name in COMPONENTS:
        model = getattr(sd15, name)
        assert list(model.parameters()) == parameters[name]  # the same Parameter objects
        for key, value in model.state_dict().items():
            assert value.dtype == before[name][key].dtype
            assert torch.equal(value, before[name][key]), f"{name}.{key}"
    assert {p.dtype for p in sd15.unet.parameters()} == {torch.float32}


# --- the training state ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kinds",
    [
        {"unet": "adamw8bit", "text_encoder": "prodigy"},
        {"unet": "adamw", "text_encoder": "adamw8bit"},
        {"unet": "prodigy"},
    ],
)
def test_training_state_round_trips_exactly(sd15, tmp_path, kinds):
    state, trainings = make_state(sd15, kinds)
    path = save_checkpoint(tmp_path / "ckpt", sd15, state)
    assert has_training_state(path)
    # The file reads back with the safe loader, with no allowlist.
    torch.load(path / STATE_DIR / "state.pt", weights_only=True)

    loaded = load_training_state(path)
    for field in state.__dataclass_fields__:
        assert_same(getattr(state, field), getattr(loaded, field), field)
    assert isinstance(loaded.rng["python"], tuple)
    random.Random().setstate(loaded.rng["python"])
    torch.Generator().set_state(loaded.rng["generator"])

    # A fresh optimizer and scheduler given the loaded state take the same next step.
    for name, (parameters, optimizer, scheduler, build) in trainings.items():
        fresh_parameters = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
        fresh = build(fresh_parameters)
        fresh_scheduler = get_scheduler("cosine", fresh, num_warmup_steps=1, num_training_steps=10)
        fresh.load_state_dict(loaded.optimizers[name])
        fresh_scheduler.load_state_dict(loaded.schedulers[name])
        for params, opt, sched in (
            (parameters, optimizer, scheduler),
            (fresh_parameters, fresh, fresh_scheduler),
        ):
            fake_grads(params, 99)
            opt.step()
            sched.step()
        assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
        for a, b in zip(parameters, fresh_parameters, strict=True):
            assert torch.equal(a, b), name


def test_8bit_state_is_really_8bit(sd15):
    """Guards the round-trip test above: the tiny UNet is big enough for 8-bit state."""
    state, _ = make_state(sd15, {"unet": "adamw8bit"})

    def dtypes(value) -> set[torch.dtype]:
        if isinstance(value, torch.Tensor):
            return {value.dtype}
        if isinstance(value, dict):
            return set().union(*(dtypes(v) for v in value.values()))
        return set()

    assert torch.uint8 in dtypes(state.optimizers["unet"]["state"])


@pytest.mark.slow
def test_only_trained_models_are_copied_and_frozen_ones_come_from_the_base(sd21, tmp_path):
    """Checkpoint weight: fp32 copies of what trains only; frozen models that fp16 rounds are
    restored exactly from the run's base model (here the built-in tiny-sd21)."""
    before = weights(sd21)
    state, _ = make_state(sd21, {"unet": "adamw"})
    state.frozen_weights = frozen_weights_reference(sd21, ("unet",), "tiny-sd21")
    assert sorted(state.frozen_weights["sha256"]) == ["text_encoder", "vae"]
    path = save_checkpoint(tmp_path / "ckpt", sd21, state)
    document = json.loads((path / STATE_DIR / "state.json").read_text())
    assert document["full_precision_weights"] == ["unet"]
    names = sorted(p.name for p in (path / STATE_DIR).iterdir())
    assert names == ["state.json", "state.pt", "unet.safetensors"]

    loaded = load_models(str(path))
    assert not torch.equal(loaded.unet.conv_in.weight, before["unet"]["conv_in.weight"])
    assert not torch.equal(
        loaded.vae.encoder.conv_in.weight, before["vae"]["encoder.conv_in.weight"]
    )
    restore_full_precision_weights(path, loaded)
    for name in COMPONENTS:
        for key, value in getattr(loaded, name).state_dict().items():
            assert value.dtype == torch.float32
            assert torch.equal(value, before[name][key]), f"{name}.{key}"


def test_frozen_weights_that_changed_at_the_base_are_not_used(sd21, tmp_path, caplog):
    state, _ = make_state(sd21, {"unet": "adamw"})
    state.frozen_weights = frozen_weights_reference(sd21, ("unet",), "tiny-sd21")
    state.frozen_weights["sha256"]["vae"] = "0" * 64  # as if the base model had changed
    path = save_checkpoint(tmp_path / "ckpt", sd21, state)
    loaded = load_models(str(path))
    restore_full_precision_weights(path, loaded)
    assert "vae in tiny-sd21 changed since the run started" in caplog.text
    assert torch.equal(
        loaded.vae.encoder.conv_in.weight, sd21.vae.encoder.conv_in.weight.half().float()
    )
    assert torch.equal(
        loaded.text_encoder.state_dict()["final_layer_norm.weight"],
        sd21.text_encoder.state_dict()["final_layer_norm.weight"],
    )


def test_frozen_models_exact_in_fp16_need_no_reference(sd21):
    bundle = copy.deepcopy(sd21)
    with torch.no_grad():
        for p in [*bundle.vae.parameters(), *bundle.text_encoder.parameters()]:
            p.copy_(p.half().float())
    assert frozen_weights_reference(bundle, ("unet",), "tiny-sd21") is None


def test_checkpoint_folders_get_the_usual_permissions(sd15, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", sd15, None)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask


def test_full_precision_checkpoint_needs_no_copies(sd15, tmp_path):
    state, _ = make_state(sd15, {"unet": "adamw", "text_encoder": "adamw"})
    path = save_checkpoint(tmp_path / "ckpt", sd15, state, SaveOptions(full_precision=True))
    assert sorted(p.name for p in (path / STATE_DIR).iterdir()) == ["state.json", "state.pt"]
    loaded = load_models(str(path))
    restore_full_precision_weights(path, loaded)  # nothing to restore, and no error
    for name in COMPONENTS:
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, getattr(sd15, name).state_dict()[key]), f"{name}.{key}"


def test_state_that_the_safe_loader_would_refuse_is_rejected_at_save(sd15, tmp_path):
    state, _ = make_state(sd15, {"unet": "adamw"})
    state.rng["numpy"] = np.random.default_rng(0).random(3)
    with pytest.raises(TypeError, match=r"weights_only=True"):
        save_checkpoint(tmp_path / "ckpt", sd15, state, SaveOptions(full_precision=True))
    assert list(tmp_path.iterdir()) == []


def test_wrong_format_version_and_corrupt_state_are_user_errors(sd15, tmp_path):
    state, _ = make_state(sd15, {"unet": "adamw"})
    path = save_checkpoint(tmp_path / "ckpt", sd15, state, SaveOptions(full_precision=True))
    state_json = path / STATE_DIR / "state.json"
    document = json.loads(state_json.read_text())

    state_json.write_text(json.dumps({**document, "format_version": 99}))
    with pytest.raises(UserError, match=r"format_version 99.*reads version 1"):
        load_training_state(path)

    state_json.write_text(json.dumps({**document, "global_step": "7"}))
    with pytest.raises(UserError, match=r"global_step"):
        load_training_state(path)

    state_json.write_text(json.dumps(document))
    (path / STATE_DIR / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=rf"{STATE_DIR}/ subfolder"):
        load_training_state(path)


# --- atomic writes and errors ---------------------------------------------------------------


def crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


@pytest.mark.parametrize(
    ("module", "where"),
    [(checkpoint, "_write_training_state"), (atomic, "sync_tree"), (atomic, "_fsync")],
)
@pytest.mark.slow
def test_crash_mid_save_leaves_previous_checkpoint(sd15, tmp_path, monkeypatch, module, where):
    path = tmp_path / "ckpt"
    with monkeypatch.context() as patch:  # the very first save crashes: nothing at path
        patch.setattr(module, where, crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 1)[0])
    assert list(tmp_path.iterdir()) == []

    save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 1)[0])
    with monkeypatch.context() as patch:
        patch.setattr(module, where, crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 2)[0])
    names = sorted(p.name for p in tmp_path.iterdir())
    if where == "_fsync":  # the first fsync is a file's, before the rename: nothing changed
        assert names == ["ckpt"]
    assert load_training_state(path).global_step == 1
    StableDiffusionPipeline.from_pretrained(str(path))


def test_checkpoint_left_aside_by_a_killed_save_is_put_back(sd15, tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 1)[0])
    # As if this process died between moving the old checkpoint aside and renaming the new one.
    aside = tmp_path / f".ckpt.old-{os.getpid()}-dead"
    path.rename(aside)
    (tmp_path / ".ckpt.partial-999999999-x").mkdir()
    monkeypatch.setattr(checkpoint, "_write_training_state", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 2)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_training_state(path).global_step == 1


def test_replacing_a_checkpoint(sd15, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 1)[0])
    save_checkpoint(path, sd15, None, SaveOptions(full_precision=True))
    assert not has_training_state(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(sd15, tmp_path):
    path = tmp_path / "photos"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"photos.*not a checkpoint"):
        save_checkpoint(path, sd15, None)
    assert (path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_target_under_a_file_is_a_user_error(sd15, tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "ckpt"
    with pytest.raises(UserError, match=r"afile/ckpt: .*afile is a file, not a folder"):
        save_checkpoint(target, sd15, None)


def test_read_only_folder_is_a_user_error(sd15, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) can write to a read-only folder")
        with pytest.raises(UserError, match=r"readonly/ckpt: Permission denied"):
            save_checkpoint(folder / "ckpt", sd15, None)
    finally:
        folder.chmod(0o700)


@pytest.fixture
def file_size_limit():
    """Writes beyond the limit fail with EFBIG, the way a full disk fails with ENOSPC."""
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, previous_limit[1]))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
    signal.signal(signal.SIGXFSZ, previous_handler)


@pytest.mark.parametrize("full_precision", [False, True])
def test_failed_write_is_a_user_error_and_keeps_the_previous(
    sd15, tmp_path, file_size_limit, full_precision
):
    path = tmp_path / "ckpt"
    save_checkpoint(path, sd15, make_state(sd15, {"unet": "adamw"}, 1)[0])
    # AdamW over the whole UNet: state.pt holds 2 × 3.2 MB of moments.
    state = make_state(sd15, {"unet": "adamw"}, 2, max_values=None)[0]
    # fp16: the pipeline's UNet file (1.6 MB) fails; fp32: the pipeline (3.2 MB files at most)
    # fits and state.pt fails, inside torch.save.
    file_size_limit(4_000_000 if full_precision else 1_000_000)
    with pytest.raises(UserError, match=r"cannot write the checkpoint .*ckpt: .*File too large"):
        save_checkpoint(path, sd15, state, SaveOptions(full_precision=full_precision))
    file_size_limit(resource.RLIM_INFINITY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_training_state(path).global_step == 1
    loaded = load_models(str(path))
    restore_full_precision_weights(path, loaded)
    assert torch.equal(loaded.unet.conv_in.weight, sd15.unet.conv_in.weight)


# --- fingerprint ----------------------------------------------------------------------------


def fingerprint_state(fingerprint: dict) -> TrainingState:
    return TrainingState(0, 0, 0, 0, {}, {}, None, {}, fingerprint, {})


def test_matching_fingerprint_passes():
    fingerprint = {"unet": {"optimizer": "adamw", "trainable_parameters": 5}, "text_encoder": None}
    check_fingerprint(fingerprint_state(fingerprint), copy.deepcopy(fingerprint), Path("x"))


def test_fingerprint_mismatch_names_both_sides(tmp_path):
    saved = {
        "unet": {"optimizer": "adamw", "trainable_parameters": 5},
        "text_encoder": {"optimizer": "adamw8bit", "trainable_parameters": 7},
    }
    now = {"unet": {"optimizer": "lion", "trainable_parameters": 5}, "text_encoder": None}
    with pytest.raises(UserError) as caught:
        check_fingerprint(fingerprint_state(saved), now, tmp_path / "ckpt")
    message = str(caught.value)
    assert str(tmp_path / "ckpt") in message
    assert "optimizer 'adamw' for unet; the current settings say 'lion'" in message
    assert "text_encoder was trained with optimizer 'adamw8bit' in the checkpoint" in message
    assert "now not trained" in message
    assert f"without its {STATE_DIR}/ subfolder" in message


def test_fingerprint_parameter_count_mismatch():
    saved = {"unet": None, "text_encoder": {"optimizer": "adamw", "trainable_parameters": 7}}
    now = {"unet": None, "text_encoder": {"optimizer": "adamw", "trainable_parameters": 9}}
    with pytest.raises(UserError, match=r"text_encoder had 7 trainable parameters, now 9"):
        check_fingerprint(fingerprint_state(saved), now, Path("ckpt"))
