"""EveryDream2 plugins (issue 9): loading, every hook with EveryDream2's arguments, transforms,
time limits, errors, and grad_accum updates."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest

import plugins
import plugins.runner as runner
from tests.e2e import ADAMW, checkpoints, run, write_config

# A plugin written the way EveryDream2's are: its own file in a plugins/ folder beside
# train.json, `from plugins.plugins import BasePlugin`, hooks taking **kwargs.
COUNTING_PLUGIN = """
import json
from collections import Counter
from plugins.plugins import BasePlugin


class CountingPlugin(BasePlugin):
    def __init__(self):
        self.calls = Counter()
        self.keys = {}
        self.steps = []

    def _seen(self, hook, kwargs):
        self.calls[hook] += 1
        self.keys[hook] = sorted(kwargs)

    def on_training_start(self, **kwargs):
        self._seen("on_training_start", kwargs)
        self.log_folder = kwargs["log_folder"]

    def on_epoch_start(self, **kwargs):
        self._seen("on_epoch_start", kwargs)

    def on_step_start(self, **kwargs):
        self._seen("on_step_start", kwargs)
        assert kwargs["batch"]["tokens"].shape[1] == 77
        assert len(kwargs["batch"]["captions"]) == kwargs["batch"]["image"].shape[0]
        assert kwargs["ed_state"].unet is not None

    def on_step_end(self, **kwargs):
        self._seen("on_step_end", kwargs)
        self.steps.append((kwargs["epoch"], kwargs["local_step"], kwargs["global_step"]))

    def on_epoch_end(self, **kwargs):
        self._seen("on_epoch_end", kwargs)

    def on_training_end(self, **kwargs):
        self._seen("on_training_end", kwargs)
        report = {"calls": self.calls, "keys": self.keys, "steps": self.steps}
        with open(self.log_folder + "/plugin-report.json", "w") as f:
            json.dump(report, f)

    def transform_caption(self, caption):
        return caption + ", seen by the plugin"
"""

EVERYDREAM2_KEYWORDS = {
    "on_training_start": ["log_folder", "project_name"],
    "on_training_end": [],
    "on_epoch_start": [
        "arg_update_callback",
        "data_root",
        "epoch",
        "epoch_length",
        "global_step",
        "log_folder",
        "project_name",
    ],
    "on_epoch_end": [
        "arg_update_callback",
        "data_root",
        "epoch",
        "global_step",
        "log_folder",
        "project_name",
    ],
    "on_step_start": [
        "batch",
        "ed_state",
        "epoch",
        "global_step",
        "local_step",
        "log_folder",
        "project_name",
    ],
    "on_step_end": [
        "batch",
        "data_root",
        "ed_state",
        "epoch",
        "global_step",
        "local_step",
        "log_folder",
        "project_name",
    ],
}


@pytest.fixture(autouse=True)
def fresh_plugin_modules(monkeypatch):
    """Each test imports its own plugins (a real run imports them once per process)."""
    monkeypatch.setattr(plugins, "__path__", list(plugins.__path__))
    yield
    ours = {
        "plugins",
        "plugins.plugins",
        "plugins.loading",
        "plugins.runner",
        "plugins.example_plugin",
    }
    for name in [n for n in sys.modules if n.startswith("plugins.") and n not in ours]:
        del sys.modules[name]


def plugin_folder(folder: Path, name: str, source: str) -> None:
    (folder / "plugins").mkdir(parents=True, exist_ok=True)
    (folder / "plugins" / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.mark.slow
def test_an_everydream2_plugin_sees_every_hook_with_everydream2s_arguments(tmp_path):
    plugin_folder(tmp_path, "counting", COUNTING_PLUGIN)
    config = write_config(
        tmp_path, ADAMW, plugins=["plugins.counting.CountingPlugin"], write_schedule=True
    )
    assert run(config) == 0
    (report_file,) = (tmp_path / "logs").glob("*/plugin-report.json")
    report = json.loads(report_file.read_text())
    batches = 7 * 2  # 7 batches per epoch, 2 epochs
    assert report["calls"] == {
        "on_training_start": 1,
        "on_epoch_start": 2,
        "on_step_start": batches,
        "on_step_end": batches,
        "on_epoch_end": 2,
        "on_training_end": 1,
    }
    assert report["keys"] == EVERYDREAM2_KEYWORDS
    epochs_and_local_steps = [(epoch, local) for epoch, local, _ in report["steps"]]
    assert epochs_and_local_steps == [(e, s) for e in range(2) for s in range(7)]
    assert [global_step for *_, global_step in report["steps"]] == list(range(1, batches + 1))


@pytest.mark.slow
def test_caption_transforms_reach_the_step(tmp_path, monkeypatch):
    plugin_folder(tmp_path, "counting", COUNTING_PLUGIN)
    seen: list[str] = []
    import training.step as step

    real = step.CaptionTokenizer.__call__

    def record(self, captions):
        seen.extend(captions)
        return real(self, captions)

    monkeypatch.setattr(step.CaptionTokenizer, "__call__", record)
    config = write_config(
        tmp_path, ADAMW, max_epochs=1, cond_dropout=0.0, plugins=["plugins.counting.CountingPlugin"]
    )
    assert run(config) == 0
    assert seen and all(c.endswith(", seen by the plugin") for c in seen if c)


@pytest.mark.parametrize(
    ("entry", "source", "expected"),
    [
        ("nomodule.Plugin", None, "'nomodule.Plugin': no module named 'nomodule'"),
        ("plugins.mine.Missing", "x = 1\n", "module plugins.mine has no class 'Missing'"),
        ("plugins.mine.NotOne", "class NotOne:\n    pass\n", "NotOne is not a plugin"),
        ("Plugin", None, "'Plugin': expected 'module.Class'"),
        (
            "plugins.mine.Broken",
            "from plugins.plugins import BasePlugin\nclass Broken(BasePlugin):\n"
            "    def __init__(self):\n        raise ValueError('no config file')\n",
            "constructing Broken() failed: ValueError: no config file",
        ),
        (
            "plugins.mine.X",
            "import not_installed_package\n",
            "no module named 'not_installed_package'",
        ),
    ],
)
def test_a_bad_plugin_entry_is_exit_2_before_any_model_loads(
    tmp_path, monkeypatch, caplog, entry, source, expected
):
    if source is not None:
        plugin_folder(tmp_path, "mine", source)
    import training.build

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(training.build, "load_models", no_models)
    assert run(write_config(tmp_path, ADAMW, plugins=[entry]), "--dry_run") == 2
    assert expected in caplog.text


@pytest.mark.slow
def test_a_slow_hook_gets_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    plugin_folder(
        tmp_path,
        "slow",
        """
        import time
        from plugins.plugins import BasePlugin

        class Slow(BasePlugin):
            def on_epoch_end(self, **kwargs):
                time.sleep(0.05)
    """,
    )
    monkeypatch.setitem(runner.LIMITS, "on_epoch_end", 0.01)
    config = write_config(tmp_path, ADAMW, max_epochs=1, plugins=["plugins.slow.Slow"])
    assert run(config) == 0
    assert "plugin Slow.on_epoch_end took" in caplog.text
    assert "longer than the 0.01 s EveryDream2 allows epoch hooks" in caplog.text


@pytest.mark.slow
def test_arg_update_callback_changes_grad_accum_from_the_next_epoch(tmp_path):
    plugin_folder(
        tmp_path,
        "accum",
        """
        from plugins.plugins import BasePlugin

        class Accum(BasePlugin):
            def on_epoch_end(self, **kwargs):
                kwargs["arg_update_callback"]("grad_accum", 2)
    """,
    )
    config = write_config(tmp_path, ADAMW, plugins=["plugins.accum.Accum"])
    assert run(config) == 0
    # epoch 1: 7 steps of 1 batch; epoch 2: windows of 2, 2, 2, 1 batches
    (last,) = checkpoints(tmp_path, "last-")
    assert last.name == "last-myproj-ep02-gs00011"


@pytest.mark.slow
def test_the_example_plugin_runs(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = write_config(
        tmp_path, ADAMW, max_epochs=1, plugins=["plugins.example_plugin.ExampleLoggingPlugin"]
    )
    assert run(config) == 0
    assert "ExampleLoggingPlugin.on_epoch_end: epoch=0" in caplog.text


SDXL_PLUGIN = """
import json
from plugins.plugins import BasePlugin


class SdxlPlugin(BasePlugin):
    def on_training_start(self, **kwargs):
        self.log_folder = kwargs["log_folder"]
        self.seen = []

    def on_step_end(self, **kwargs):
        state = kwargs["ed_state"]
        self.seen.append(
            {
                "text_encoder_ema": type(state.text_encoder_ema).__name__,
                "text_encoder_2_ema": type(state.text_encoder_2_ema).__name__,
                "text_encoder_2": type(state.text_encoder_2).__name__,
                "ema_layers_2": len(state.text_encoder_2_ema.text_model.encoder.layers),
            }
        )

    def on_step_start(self, **kwargs):
        assert list(kwargs["batch"]["tokens"].shape[1:]) == [77]

    def on_training_end(self, **kwargs):
        with open(self.log_folder + "/plugin-report.json", "w") as f:
            json.dump(self.seen, f)
"""


@pytest.mark.slow
def test_an_sdxl_run_gives_plugins_both_encoders_and_their_ema(tmp_path):
    plugin_folder(tmp_path, "sdxl", SDXL_PLUGIN)
    config = write_config(
        tmp_path,
        ADAMW,
        resume_ckpt="tiny-sdxl",
        max_epochs=1,
        plugins=["plugins.sdxl.SdxlPlugin"],
        ema_decay_rate=0.9,
        ema_update_interval=1,
    )
    assert run(config) == 0
    (report_file,) = (tmp_path / "logs").glob("*/plugin-report.json")
    seen = json.loads(report_file.read_text())
    assert len(seen) == 7
    assert seen[-1] == {
        "text_encoder_ema": "CLIPTextModel",
        "text_encoder_2_ema": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "ema_layers_2": 32,
    }
