"""load_settings_every_epoch (issue 12): train.json is read again before each epoch."""

from __future__ import annotations

import json
import logging

import pytest

from tests.e2e import ADAMW, run, run_folders, scalars, write_config

EDITING_PLUGIN = """
import json
from plugins.plugins import BasePlugin


class Edit(BasePlugin):
    def on_epoch_end(self, **kwargs):
        path = {path!r}
        settings = json.load(open(path))
        settings.update(log_step=7, zero_frequency_noise_ratio=0.5, batch_size=1)
        json.dump(settings, open(path, "w"))
"""


@pytest.mark.slow
def test_live_keys_change_between_epochs_and_the_others_are_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = write_config(
        tmp_path,
        ADAMW,
        max_epochs=2,
        log_step=1,
        load_settings_every_epoch=True,
        plugins=["editing.Edit"],
    )
    (tmp_path / "editing.py").write_text(EDITING_PLUGIN.format(path=str(config)))
    assert run(config) == 0
    (folder,) = run_folders(tmp_path)
    assert len(scalars(folder, "loss/train")) == 7 + 1  # log_step 1, then 7 from epoch 2
    assert f"epoch 2: zero_frequency_noise_ratio 0.02 -> 0.5 ({config})" in caplog.text
    assert "batch_size changed; only zero_frequency_noise_ratio," in caplog.text


@pytest.mark.slow
def test_a_broken_edit_keeps_the_settings_in_force(tmp_path, caplog):
    config = write_config(
        tmp_path, ADAMW, max_epochs=2, load_settings_every_epoch=True, plugins=["breaking.Break"]
    )
    (tmp_path / "breaking.py").write_text(
        "from plugins.plugins import BasePlugin\n\n"
        "class Break(BasePlugin):\n"
        "    def on_epoch_end(self, **kwargs):\n"
        f"        open({str(config)!r}, 'w').write('{{ not json')\n"
    )
    assert run(config) == 0
    assert "cannot be read again" in caplog.text and "settings in force are kept" in caplog.text
    assert json.loads((next((tmp_path / "logs").iterdir()) / "config.json").read_text())
