"""No crash loses training (issue 8): crashed-, diverged- and time-based checkpoints resume
exactly; faults end in one clear line; runs never replace each other's checkpoints."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from tests.e2e import (
    ADAMW,
    checkpoints,
    run,
    run_folders,
    trained_weights,
    write_config,
)
from tests.group import run_forked
from training.checkpointing import periodic

pytestmark = pytest.mark.slow


def write_plugin(folder: Path, name: str, body: str) -> str:
    """A plugin module ``<name>.py`` in ``folder`` (train.json's folder); returns its entry.

    Each test names its own module: a process imports a module once.
    """
    folder.mkdir(parents=True, exist_ok=True)
    source = "import os, signal\nfrom plugins.plugins import BasePlugin\n\n" + textwrap.dedent(body)
    (folder / f"{name}.py").write_text(source)
    return f"{name}.Plugin"


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = trained_weights(a), trained_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class MinuteClock:
    """``time`` for the periodic checkpoints: each reading of ``monotonic`` a minute later."""

    def __init__(self) -> None:
        self.readings = 0

    def monotonic(self) -> float:
        self.readings += 1
        return 60.0 * self.readings


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A 2-epoch run with a resumable time checkpoint at the end of its first epoch (shared,
    read-only). The clock is read at the start and after each optimizer step (and twice at a
    checkpoint), so every 7 minutes is due at the 7th step, the first epoch's last."""
    folder = tmp_path_factory.mktemp("straight")
    config = write_config(folder, ADAMW, ckpt_every_n_minutes=7, save_optimizer=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(periodic, "time", MinuteClock())
        assert run(config) == 0
    return folder


def test_a_time_checkpoint_at_the_end_of_an_epoch_resumes_exactly(straight, tmp_path):
    (end_of_epoch,) = checkpoints(straight, "myproj-ep01-gs00007")
    state = json.loads((end_of_epoch / "training_state" / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)
    resumed = write_config(tmp_path, ADAMW, resume_ckpt=str(end_of_epoch))
    assert run(resumed) == 0
    (full,) = checkpoints(straight, "last-")
    (continued,) = checkpoints(tmp_path, "last-")
    assert same_weights(full, continued)


def test_a_crash_leaves_a_resumable_checkpoint_and_one_line_on_screen(straight, tmp_path, caplog):
    entry = write_plugin(
        tmp_path / "crash",
        "raising_plugin",
        """
        class Plugin(BasePlugin):
            def on_step_end(self, **kwargs):
                if kwargs["global_step"] == 5:
                    raise RuntimeError("boom")
    """,
    )
    config = write_config(tmp_path / "crash", ADAMW, plugins=[entry])
    assert run(config) == 1
    assert "Traceback" not in caplog.text  # what the screen shows
    assert (
        "training crashed: PluginError: plugin Plugin.on_step_end raised RuntimeError: boom"
        in caplog.text
    )
    (folder,) = run_folders(tmp_path / "crash")
    log = (folder / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: boom" in log
    (crashed,) = checkpoints(tmp_path / "crash", "crashed-")
    assert crashed.name == "crashed-myproj-ep00-gs00005"
    # Without the plugin, the crashed checkpoint continues exactly like the run never crashed.
    resumed = write_config(tmp_path / "resumed", ADAMW, resume_ckpt=str(crashed))
    assert run(resumed) == 0
    (full,) = checkpoints(straight, "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    assert same_weights(full, continued)


def test_data_deleted_mid_run_is_one_line_and_keeps_the_training(tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "data", data)
    entry = write_plugin(
        tmp_path / "run",
        "deleting_plugin",
        f"""
        import shutil
        class Plugin(BasePlugin):
            def on_step_end(self, **kwargs):
                if kwargs["global_step"] == 2:
                    shutil.rmtree({str(data)!r})
    """,
    )
    config = write_config(tmp_path / "run", ADAMW, data_root=str(data), plugins=[entry])
    assert run(config) == 2
    assert "Traceback" not in caplog.text
    assert f"data_root {data}" in caplog.text
    (crashed,) = checkpoints(tmp_path / "run", "crashed-")
    assert (crashed / "training_state" / "state.json").exists()


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    entry = write_plugin(
        tmp_path,
        "signalling_plugin",
        """
        class Plugin(BasePlugin):
            def on_step_end(self, **kwargs):
                if kwargs["global_step"] == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)
    """,
    )
    result = run_forked(write_config(tmp_path, ADAMW, plugins=[entry]))
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    assert "stopped by a second Ctrl-C: no checkpoint was saved" in result.stderr
    assert checkpoints(tmp_path) == []


def test_two_runs_never_replace_each_others_checkpoints(tmp_path):
    shared = tmp_path / "ckpts"
    first = write_config(tmp_path / "a", ADAMW, max_epochs=1, save_ckpt_dir=str(shared))
    second = write_config(tmp_path / "b", ADAMW, max_epochs=1, save_ckpt_dir=str(shared), lr=2e-4)
    assert run(first) == 0
    before = trained_weights(shared / "last-myproj-ep01-gs00007")
    assert run(second) == 0
    names = sorted(p.name for p in shared.iterdir() if p.is_dir())
    assert names == ["last-myproj-ep01-gs00007", "last-myproj-ep01-gs00007-2"]
    after = trained_weights(shared / "last-myproj-ep01-gs00007")
    assert all(torch.equal(before[k], after[k]) for k in before)
    notes = [json.loads((shared / n / "dreamtrainer.json").read_text())["run"] for n in names]
    assert notes[0] != notes[1]


def test_a_full_disk_when_writing_the_config_is_one_line(tmp_path, monkeypatch, caplog):
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert run(write_config(tmp_path, ADAMW, max_epochs=1)) == 2
    assert "config.json: No space left on device" in caplog.text


def test_a_partial_training_state_is_an_error_naming_what_is_missing(straight, tmp_path, caplog):
    (last,) = checkpoints(straight, "last-")
    copy = tmp_path / "copy"
    shutil.copytree(last, copy)
    (copy / "training_state" / "state.json").unlink()
    assert run(write_config(tmp_path / "run", ADAMW, resume_ckpt=str(copy)), "--dry_run") == 2
    assert "lacks state.json (a partial training state)" in caplog.text


def test_zero_terminal_snr_is_saved_with_the_checkpoint(tmp_path):
    config = write_config(
        tmp_path, ADAMW, max_epochs=1, enable_zero_terminal_snr=True, resume_ckpt="tiny-sd21"
    )
    assert run(config) == 0
    (last,) = checkpoints(tmp_path, "last-")
    scheduler = json.loads((last / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"
    from models import load_models

    loaded = load_models(str(last))
    assert float(loaded.noise_scheduler.alphas_cumprod[-1]) == 0.0


def test_gradient_checkpointing_covers_a_frozen_unet_that_the_text_encoder_trains_through(
    tmp_path,
):
    from config.cli import parse_command_line
    from training.build import build_from_command_line
    from training.session import prepare_models

    config = write_config(
        tmp_path / "built", ADAMW, disable_unet_training=True, gradient_checkpointing=True
    )
    built, accelerator = build_from_command_line(parse_command_line(["--config", str(config)]))
    models = prepare_models(built, accelerator)
    assert built.unet_training is None and models.bundle.unet.is_gradient_checkpointing
    assert models.bundle.text_encoder.is_gradient_checkpointing

    keys = {"max_epochs": 1, "disable_unet_training": True, "save_full_precision": True}
    plain = write_config(tmp_path / "plain", ADAMW, **keys)
    checkpointed = write_config(tmp_path / "gc", ADAMW, **keys, gradient_checkpointing=True)
    assert run(plain) == 0
    assert run(checkpointed) == 0
    (a,) = checkpoints(tmp_path / "plain", "last-")
    (b,) = checkpoints(tmp_path / "gc", "last-")
    assert same_weights(a, b)  # recomputation changes memory, not results


def test_a_frozen_model_is_not_copied_and_still_resumes_exactly(tmp_path):
    keys = {
        "max_epochs": 2,
        "disable_unet_training": True,
        "save_every_n_epochs": 1,
        "save_optimizer": True,
    }
    straight = write_config(tmp_path / "straight", ADAMW, **keys)
    assert run(straight) == 0
    (middle,) = checkpoints(tmp_path / "straight", "myproj-ep01")
    names = sorted(p.name for p in (middle / "training_state").iterdir())
    assert names == ["state.json", "state.pt", "text_encoder.safetensors"]
    resumed = write_config(tmp_path / "resumed", ADAMW, **keys, resume_ckpt=str(middle))
    assert run(resumed) == 0
    (full,) = checkpoints(tmp_path / "straight", "last-")
    (continued,) = checkpoints(tmp_path / "resumed", "last-")
    from models import load_models

    for checkpoint in (full, continued):  # the frozen UNet and VAE are the built-in ones, exactly
        bundle = load_models(str(checkpoint))
        from training.checkpointing.writer import restore_full_precision_weights

        restore_full_precision_weights(checkpoint, bundle)
        base = load_models("tiny-sd15")
        assert all(
            torch.equal(v, base.unet.state_dict()[k]) for k, v in bundle.unet.state_dict().items()
        )
    assert same_weights(full, continued)
