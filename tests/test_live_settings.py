"""Settings that change during a run (plugins, load_settings_every_epoch, edits before a resume):
every change resumes exactly from a checkpoint before it and from one after it."""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from data.scan import scan
from tests.e2e import ADAMW, EXAMPLE_DATA, checkpoints, run, trained_weights, write_config
from training.build import data_settings
from training.checkpointing.state import load_training_state

pytestmark = pytest.mark.slow

# 12 example images at batch 4: 4 batches per epoch.
SMALL = {"batch_size": 4, "max_epochs": 3, "save_every_n_epochs": 1, "save_optimizer": True}
# The live settings a run starts with, and what a plugin changes them to after epoch 2.
BEFORE = {
    "grad_accum": 1,
    "clip_grad_norm": None,
    "zero_frequency_noise_ratio": 0.0,
    "pyramid_noise_discount": None,
    "timestep_start": 0,
    "timestep_end": 1000,
    "loss_type": "mse",
    "min_snr_gamma": None,
    "debiased_estimation": False,
    "input_perturbation": 0.0,
    "unmasked_weight": 0.0,
    "normalize_masked_area_loss": False,
    "embedding_perturbation": 0.0,
    "log_step": 1,
    "sample_steps": 100,
    "save_full_precision": True,
    "no_save_ckpt": True,
    "save_ckpts_from_n_epochs": 0,
}
AFTER = {
    "grad_accum": 2,
    "clip_grad_norm": 0.5,
    "zero_frequency_noise_ratio": 0.1,
    "pyramid_noise_discount": 0.3,
    "timestep_start": 100,
    "timestep_end": 900,
    "loss_type": "huber",
    "min_snr_gamma": 5.0,
    "debiased_estimation": True,
    "input_perturbation": 0.1,
    "unmasked_weight": 0.5,
    "normalize_masked_area_loss": True,
    "embedding_perturbation": 0.1,
    "log_step": 2,
    "sample_steps": 50,
    "save_full_precision": False,  # fp32 checkpoints, then fp16 ones: frozen weights stay exact
    "no_save_ckpt": True,
    "save_ckpts_from_n_epochs": 1,
}
CHANGING_PLUGIN = """
from plugins.plugins import BasePlugin

class Plugin(BasePlugin):
    def on_epoch_end(self, epoch, arg_update_callback, **kwargs):
        if epoch == {epoch}:
            for key, value in {changes!r}.items():
                arg_update_callback(key, value)
"""


def plugin(folder: Path, name: str, source: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return f"{name}.Plugin"


def one_checkpoint(folder: Path, prefix: str) -> Path:
    """The one checkpoint of the runs under ``folder`` named ``prefix...`` (not its _ema)."""
    (found,) = [p for p in checkpoints(folder, prefix) if not p.name.endswith("_ema")]
    return found


def same_run(a: Path, b: Path) -> None:
    """The final weights, the EMA and the counters of two checkpoints are identical."""
    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_training_state(a), load_training_state(b)
    assert sa.global_step == sb.global_step
    ema_a, ema_b = (s.components.get("ema", {}).get("weights", {}) for s in (sa, sb))
    assert ema_a.keys() == ema_b.keys()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def live_settings(checkpoint: Path) -> dict:
    return load_training_state(checkpoint).counters["live_settings"]


@pytest.fixture(scope="module")
def changed_by_a_plugin(tmp_path_factory) -> tuple[Path, str]:
    """3 epochs; after epoch 2 a plugin changes every live key (shared, read-only)."""
    folder = tmp_path_factory.mktemp("plugin")
    entry = plugin(folder, "live_changing", CHANGING_PLUGIN.format(epoch=1, changes=AFTER))
    keys = SMALL | BEFORE | {"ema_strength_target": 0.5, "plugins": [entry]}
    config = write_config(folder, ADAMW, **keys)
    assert run(config) == 0
    return folder, entry


def test_every_live_key_resumes_exactly_before_and_after_a_plugin_changes_it(
    changed_by_a_plugin, tmp_path
):
    straight, entry = changed_by_a_plugin
    last = one_checkpoint(straight, "last-")
    before = one_checkpoint(straight, "myproj-ep01-")
    after = one_checkpoint(straight, "myproj-ep02-")
    assert live_settings(before)["grad_accum"] == 1
    assert {k: live_settings(after)[k] for k in AFTER} == AFTER  # in force from epoch 3
    assert load_training_state(last).global_step == 4 + 4 + 2
    for name, start in (("before", before), ("after", after)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(straight / "live_changing.py", folder / "live_changing.py")
        keys = SMALL | BEFORE | {"ema_strength_target": 0.5, "plugins": [entry]}
        config = write_config(folder, ADAMW, resume_ckpt=str(start), **keys)
        assert run(config) == 0
        resumed = one_checkpoint(folder, "last-")
        same_run(last, resumed)


EDITING_PLUGIN = """
import json
from plugins.plugins import BasePlugin

class Plugin(BasePlugin):
    def on_epoch_end(self, epoch, **kwargs):
        if epoch == 1:
            path = {path!r}
            settings = json.load(open(path))
            settings.update({changes!r})
            json.dump(settings, open(path, "w"))
"""


def with_batch_ids(folder: Path) -> Path:
    """The example images, the stripes in a batch_id of their own."""
    data = folder / "data"
    shutil.copytree(EXAMPLE_DATA, data)
    (data / "stripes" / "batch_id.txt").write_text("stripes")
    return data


def test_a_grad_accum_change_from_train_json_replans_batch_ids_and_resumes_exactly(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    changes = {"grad_accum": 2, "loss_type": "huber"}
    keys = SMALL | {"load_settings_every_epoch": True, "write_schedule": True}
    straight = tmp_path / "straight"
    straight.mkdir()
    keys["data_root"] = str(with_batch_ids(straight))
    config = write_config(straight, ADAMW, **keys)
    entry = plugin(
        straight, "live_editing", EDITING_PLUGIN.format(path=str(config), changes=changes)
    )
    original = write_config(straight, ADAMW, plugins=[entry], **keys).read_text()
    assert run(config) == 0
    edited = config.read_text()
    assert json.loads(edited)["grad_accum"] == 2
    assert "the run now has 10 optimizer steps; the LR schedule and the EMA keep the length" in (
        caplog.text
    )
    # the third epoch's plan: the batch-id windows of grad_accum 2
    (run_folder,) = [p for p in (straight / "logs").iterdir() if p.is_dir()]
    written = json.loads((run_folder / "schedule-ep003.txt").read_text())
    dataset_settings = data_settings(_loaded(config), 555)
    from data import TrainDataset

    images, skipped = scan(dataset_settings)
    planned = TrainDataset(dataset_settings, images, skipped).epoch_batches(2, grad_accum=2)
    assert [[i["path"] for i in b["images"]] for b in written["batches"]] == [
        [item.path for item in plan.items] for plan in planned
    ]
    last = one_checkpoint(straight, "last-")
    before = one_checkpoint(straight, "myproj-ep01-")
    after = one_checkpoint(straight, "myproj-ep02-")
    for start, text in ((before, original), (after, edited)):
        # train.json as it was when the checkpoint was written
        resumed = json.loads(text) | {"resume_ckpt": str(start)}
        resumed["logdir"] = str(tmp_path / start.name / "logs")
        config.write_text(json.dumps(resumed))
        assert run(config) == 0
        continued = one_checkpoint(tmp_path / start.name, "last-")
        same_run(last, continued)


def _loaded(config: Path):
    from config.cli import parse_command_line
    from config.load import load_train_config

    return load_train_config(parse_command_line(["--config", str(config)]))


def test_resuming_with_an_edited_grad_accum_trains_with_it(tmp_path, caplog):
    keys = SMALL | {"max_epochs": 2}
    plain = write_config(tmp_path / "plain", ADAMW, **keys)
    assert run(plain) == 0
    epoch_one = one_checkpoint(tmp_path / "plain", "myproj-ep01-")
    plain_last = one_checkpoint(tmp_path / "plain", "last-")
    # the straight run: grad_accum 2 from the second epoch on, set by a plugin
    entry = plugin(
        tmp_path / "straight",
        "live_accum",
        CHANGING_PLUGIN.format(epoch=0, changes={"grad_accum": 2}),
    )
    straight = write_config(tmp_path / "straight", ADAMW, plugins=[entry], **keys)
    assert run(straight) == 0
    straight_last = one_checkpoint(tmp_path / "straight", "last-")
    # resume the plain run's checkpoint with train.json now saying 2
    caplog.clear()
    edited = write_config(
        tmp_path / "edited", ADAMW, resume_ckpt=str(epoch_one), grad_accum=2, **keys
    )
    assert run(edited) == 0
    edited_last = one_checkpoint(tmp_path / "edited", "last-")
    same_run(straight_last, edited_last)
    assert load_training_state(edited_last).global_step == 4 + 2
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            trained_weights(plain_last).values(), trained_weights(edited_last).values(), strict=True
        )
    )
    assert "grad_accum: 1 when the checkpoint was saved, 2 now: the new value applies now" in (
        caplog.text
    )
    assert "data or its settings changed" not in caplog.text


CRASHING_PLUGIN = """
from plugins.plugins import BasePlugin

class Plugin(BasePlugin):
    def on_step_end(self, epoch, local_step, **kwargs):
        if (epoch, local_step) == (0, 1):
            raise RuntimeError("boom")
"""


def test_train_json_is_read_again_at_the_first_epoch_after_a_mid_epoch_resume(tmp_path):
    keys = SMALL | {"max_epochs": 2, "load_settings_every_epoch": True}
    entry = plugin(tmp_path / "crash", "live_crashing", CRASHING_PLUGIN)
    crashing = write_config(tmp_path / "crash", ADAMW, plugins=[entry], **keys)
    assert run(crashing) == 1
    crashed = one_checkpoint(tmp_path / "crash", "crashed-")
    assert load_training_state(crashed).batch_in_epoch == 2
    # resumed mid-epoch; train.json is edited during the rest of that epoch
    folder = tmp_path / "resumed"
    config = write_config(folder, ADAMW, resume_ckpt=str(crashed), **keys)
    editing = """
    import json
    from plugins.plugins import BasePlugin

    class Plugin(BasePlugin):
        def on_step_end(self, **kwargs):
            path = {path!r}
            settings = json.load(open(path))
            settings["loss_type"] = "huber"
            json.dump(settings, open(path, "w"))
    """
    entry = plugin(folder, "live_editing_on_resume", editing.format(path=str(config)))
    write_config(folder, ADAMW, resume_ckpt=str(crashed), plugins=[entry], **keys)
    assert run(config) == 0
    last = one_checkpoint(folder, "last-")
    assert live_settings(last)["loss_type"] == "huber"  # read before the second epoch
